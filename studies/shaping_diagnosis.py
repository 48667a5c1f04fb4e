"""Where does PEC's bonus decide a group's advantages instead of the task reward? A per-group view of PEC runs.

    python studies/shaping_diagnosis.py RUN_DIR [RUN_DIR ...]

Reads each run's ``log.jsonl`` (PEC logs, per iteration and group, the task reward's in-group std and the
β-weighted bonus's) and prints, per run: the median of both spreads, the share of groups where the bonus's
spread exceeds the reward's (there the bonus, not the reward, orders the group's advantages) overall, in
each third of the run and for the prompts where it happens most. With ``pec.combine: decoupled`` the reward
enters z-scored, so its in-group spread is 1 in every group.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from trainer.config import load_config
from trainer.prompts import resolve_prompts
from trainer.runlog import read_log


def bonus_decides(run_dir: Path) -> dict:
    """Per group of every iteration: (iteration, prompt id, reward spread, bonus spread, bonus > reward)."""
    config = load_config(None, str(run_dir / "config.yaml"))
    decoupled = config.pec.combine == "decoupled"
    groups = []
    for row in read_log(run_dir):
        for pid, r_std, b_std in zip(row["prompt_ids"], row["group_reward_std"], row["group_bonus_std"], strict=True):
            spread = 1.0 if decoupled else r_std
            groups.append(
                {
                    "iteration": row["iteration"],
                    "prompt": pid,
                    "reward": r_std,
                    "bonus": b_std,
                    "decides": b_std > spread,
                }
            )
    return {"config": config, "groups": groups}


def share(groups: list[dict]) -> float:
    return sum(g["decides"] for g in groups) / len(groups) if groups else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=5, help="prompts listed per run")
    args = parser.parse_args()
    for run_dir in args.runs:
        found = bonus_decides(run_dir)
        groups, config = found["groups"], found["config"]
        prompts = resolve_prompts(config.prompts.train)
        iterations = config.train.iterations
        thirds = [[g for g in groups if k * iterations <= 3 * g["iteration"] < (k + 1) * iterations] for k in range(3)]
        by_prompt = defaultdict(list)
        for g in groups:
            by_prompt[g["prompt"]].append(g)
        worst = sorted(by_prompt.items(), key=lambda kv: -share(kv[1]))[: args.top]
        print(
            f"{run_dir} (combine {config.pec.combine}, β {config.pec.beta}): {len(groups)} groups; median in-group "
            f"std: reward {statistics.median(g['reward'] for g in groups):.4f}, β·bonus "
            f"{statistics.median(g['bonus'] for g in groups):.4f}; the bonus decides {share(groups):.0%} "
            f"(thirds of the run: {', '.join(f'{share(t):.0%}' for t in thirds)}); most: "
            + ", ".join(f"{prompts[p]!r} {share(gs):.0%} of {len(gs)}" for p, gs in worst)
        )


if __name__ == "__main__":
    main()
