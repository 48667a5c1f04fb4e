"""The method suite on the embedded world: every docs/design.md §6 method against Flow-GRPO, PEC and PCVAE.

    python studies/method_suite.py [--iterations 20] [--methods flow-grpo,pec,...] [--out runs/study_method_suite]
                                   [--prompts 6] [--per-prompt 16] [--set KEY=VALUE ...]

Trains one LoRA per method from the `demo` preset with the same seeds and iteration budget (each
method = a few `--set` overrides, listed in METHODS; the baselines switch PEC off so each is
Flow-GRPO plus that one method), then evaluates the base model and every LoRA with `pec eval`'s
machinery (held-out prompts, the same seeds for every model, ODE) and compares them with
`pec compare`'s: `table.md` / `table.csv` (paper Table-1 layout: rewards, Vendi and feature variance,
Norm.Avg, Overall), `tradeoff.png`, `grids.png`, `similarity.png`, plus `curves.png` (training reward
and per-group Vendi of every method) and `study.json` (overrides and minutes per method) in --out.
Re-running resumes: finished runs and evaluations are reused.

Budget (issue #7: every method on 2 CPU cores in ≤ 60 min): the default of 20 iterations per method
is worked out at DEFAULT_ITERATIONS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trainer.backends import EMBEDDED_MODEL
from trainer.backends.base import read_defaults
from trainer.compare import run_compare
from trainer.config import load_config
from trainer.evaluation import default_metrics, run_eval
from trainer.prompts import resolve_prompts
from trainer.runlog import read_log
from trainer.train import train

FLOW_GRPO = ["pec.method=none"]

#: name → `--set` overrides on the demo preset (demo itself is PEC at the preset's β).
METHODS: dict[str, list[str]] = {
    "flow-grpo": FLOW_GRPO,
    "pec": ["pec.method=pec"],
    "pcvae": ["pec.method=pcvae"],
    "kl": [*FLOW_GRPO, "train.kl_beta=0.04"],
    "clip-higher": [*FLOW_GRPO, "train.clip_range_high=0.002"],  # ε_high = 2·ε_low (demo ε_low = 1e-3)
    "entropy-native": [*FLOW_GRPO, "train.entropy_reg.kind=native", "train.entropy_reg.beta=0.01"],
    "entropy-perceptual": [*FLOW_GRPO, "train.entropy_reg.kind=perceptual", "train.entropy_reg.beta=0.01"],
    "clip-cov": [*FLOW_GRPO, "train.cov.kind=clip_cov"],
    "kl-cov": [*FLOW_GRPO, "train.cov.kind=kl_cov"],
    "cps": [*FLOW_GRPO, "sampling.sde=cps"],
    "mixgrpo": [*FLOW_GRPO, "sampling.window.rule=sliding"],  # shift_every set from the budget below
    "e-grpo": [*FLOW_GRPO, "sampling.window.rule=egrpo"],
    "drift": [*FLOW_GRPO, "drift.subset=true", "drift.prompt_noise=0.1", "drift.diversity_alpha=0.5"],
}

#: Budget (issue #7: ≤ 60 min on 2 CPU cores): measured 25.3 min wall for all 13 methods at 20 iterations
#: (1.2-2.6 min of training each; entropy-perceptual, with its decoder + encoder backward, the slowest;
#: E-GRPO, one trained jump per iteration, the fastest) plus the 14 evaluations and the comparison.
DEFAULT_ITERATIONS = 20


def method_overrides(name: str, iterations: int, sliding_positions: int) -> list[str]:
    """The method's overrides; MixGRPO's window visits every position once within the budget."""
    extra = [f"sampling.window.shift_every={max(1, iterations // sliding_positions)}"] if name == "mixgrpo" else []
    return [*METHODS[name], *extra]


def plot_training(logs: dict[str, list[dict]], path: Path) -> None:
    """Training reward and per-group Vendi per iteration, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in logs.items():
        its = [r["iteration"] for r in rows]
        for ax, key in zip(axes, ("reward_mean", "vendi")):
            ax.plot(its, [r.get(key, float("nan")) for r in rows], label=name, lw=1)
    for ax, title in zip(axes, ("task reward (training rollouts)", "Vendi per group (training rollouts)")):
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="training iterations per method")
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts evaluated")
    parser.add_argument("--per-prompt", type=int, default=16, help="samples per prompt in the evaluation")
    parser.add_argument("--out", default="runs/study_method_suite")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every method")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base_cfg = load_config("demo", None, args.set)
    rewards, encoders = default_metrics(base_cfg.model.path)
    prompts = resolve_prompts(base_cfg.prompts.eval)[: args.prompts]

    def evaluate(name: str, loras: list) -> Path:
        return run_eval(
            base_cfg.model.path,
            loras,
            prompts,
            args.per_prompt,
            out / "evals",
            name=name,
            rewards=rewards,
            encoders=encoders,
            progress=False,
        )

    steps = base_cfg.sampling.num_steps or read_defaults(base_cfg.model.path or EMBEDDED_MODEL, {})["num_steps"]
    positions = steps - base_cfg.sampling.window.size  # window starts 0 … steps-1-size (the last step is ODE)
    eval_dirs = [evaluate("base", [])]
    study, logs = {}, {}
    for name in names:
        overrides = [
            f"train.iterations={args.iterations}",
            *args.set,
            *method_overrides(name, args.iterations, positions),
            f"run.dir={out / 'runs' / name}",
        ]
        start = time.perf_counter()
        run_dir = train(load_config("demo", None, overrides))
        minutes = (time.perf_counter() - start) / 60
        print(f"{name}: trained in {minutes:.1f} min")
        study[name] = {"overrides": overrides, "train_minutes": round(minutes, 2)}
        logs[name] = read_log(run_dir)
        eval_dirs.append(evaluate(name, [(run_dir / "lora.safetensors", 1.0)]))

    paths = run_compare(eval_dirs, out, names=["base", *names])
    plot_training(logs, out / "curves.png")
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    print(paths["markdown"].read_text(encoding="utf-8"))
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
