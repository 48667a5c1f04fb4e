"""Flow-GRPO vs PEC on the embedded world: does perceptual-entropy shaping keep the diversity?

    python studies/flow_grpo_vs_pec.py [--iterations 30] [--train-seeds 0 1 2] [--out runs/study_flow_grpo_vs_pec]
                                       [--set KEY=VALUE ...]

Trains two LoRAs from the `demo` preset with the same seeds and budget — Flow-GRPO (no shaping) and
PEC (default β) — then samples the base model and both LoRAs on the same training prompts and seeds
(ODE) and prints a table: mean task reward, mean per-prompt Vendi in the toy-encoder space, and the
targets of issue #4 (Flow-GRPO's Vendi ≥ 30% below the base; PEC keeps ≥ 80% of the base Vendi and
reaches ≥ 70% of Flow-GRPO's reward gain). With several ``--train-seeds`` (``train.seed``: which
prompts each iteration draws and every noise) each method is trained once per seed; the table has a
row per seed and the mean, and the targets are checked on the means (one run is not a measurement:
runs of the same method differ by more than the methods do). Writes `results.md` and `results.json`
in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from comfy_pec.encoders import load_encoder
from trainer.backends import load_backend
from trainer.config import load_config
from trainer.prompts import resolve_prompts
from trainer.report import evaluate_grid
from trainer.rewards import build_reward
from trainer.train import train

METHODS = {"flow-grpo": ["pec.method=none"], "pec": ["pec.method=pec"]}


def evaluate(model_path, lora, prompts, seeds, reward_fn, encoder) -> dict:
    """Base model (``lora=None``) or base + LoRA: the report's before/after measurement, without images."""
    backend = load_backend(model_path)
    if lora is not None:
        backend.load_lora(str(lora))
    result = evaluate_grid(backend, prompts, seeds, encoder, reward_fn)
    del result["images"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=8, help="training prompts evaluated")
    parser.add_argument("--seeds", type=int, default=16, help="samples per prompt in the evaluation")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="train.seed of each run per method")
    parser.add_argument("--out", default="runs/study_flow_grpo_vs_pec")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for both methods")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base_cfg = load_config("demo", None, [f"train.iterations={args.iterations}", *args.set])
    reward_fn = build_reward(base_cfg.rewards)
    encoder = load_encoder(base_cfg.pec.encoder)
    prompts = resolve_prompts(base_cfg.prompts.train)[: args.prompts]
    seeds = list(range(1000, 1000 + args.seeds))

    base = evaluate(base_cfg.model.path, None, prompts, seeds, reward_fn, encoder)
    runs: dict[str, dict[int, dict]] = {name: {} for name in METHODS}
    for train_seed in args.train_seeds:
        for name, overrides in METHODS.items():
            run_dir = out / (name if args.train_seeds == [0] else f"{name}_seed{train_seed}")
            settings = [f"train.iterations={args.iterations}", f"train.seed={train_seed}", *args.set, *overrides]
            cfg = load_config("demo", None, [*settings, f"run.dir={run_dir}"])
            start = time.perf_counter()
            train(cfg)
            minutes = (time.perf_counter() - start) / 60
            lora = run_dir / "lora.safetensors"
            runs[name][train_seed] = {
                **evaluate(cfg.model.path, lora, prompts, seeds, reward_fn, encoder),
                "train_minutes": minutes,
            }
    means = {
        name: {
            key: sum(r[key] for r in per_seed.values()) / len(per_seed) for key in ("reward", "vendi", "train_minutes")
        }
        for name, per_seed in runs.items()
    }

    fg, pec = means["flow-grpo"], means["pec"]
    fg_gain = fg["reward"] - base["reward"]
    checks = {
        "flow-grpo Vendi >= 30% below base": fg["vendi"] <= 0.7 * base["vendi"],
        "pec keeps >= 80% of base Vendi": pec["vendi"] >= 0.8 * base["vendi"],
        "pec reaches >= 70% of flow-grpo's reward gain": (pec["reward"] - base["reward"]) >= 0.7 * fg_gain,
    }
    lines = [
        f"Embedded world, demo preset, {args.iterations} iterations each, train seeds {args.train_seeds}, "
        f"{len(prompts)} training prompts x {len(seeds)} seeds (ODE).",
        "",
        "| model | train seed | task reward | Vendi (toy encoder) | Vendi / base | gain / Flow-GRPO's (mean) | train min |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| base | | {base['reward']:.4f} | {base['vendi']:.3f} | 1.00 | | |",
    ]

    def row(name: str, seed: str, r: dict) -> str:
        gain = (r["reward"] - base["reward"]) / fg_gain if fg_gain else float("nan")
        return (
            f"| {name} | {seed} | {r['reward']:.4f} | {r['vendi']:.3f} | {r['vendi'] / base['vendi']:.2f} | "
            f"{gain:.2f} | {r['train_minutes']:.1f} |"
        )

    for name, per_seed in runs.items():
        lines += [row(name, str(seed), r) for seed, r in per_seed.items()]
        if len(per_seed) > 1:
            lines.append(row(f"**{name}**", "mean", means[name]))
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    results = {
        "base": base,
        "runs": {name: {str(k): v for k, v in rs.items()} for name, rs in runs.items()},
        "means": means,
    }
    (out / "results.json").write_text(json.dumps({"results": results, "checks": checks}, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
