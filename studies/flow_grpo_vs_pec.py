"""Flow-GRPO vs PEC on the embedded world: does perceptual-entropy shaping keep the diversity?

    python studies/flow_grpo_vs_pec.py [--iterations 30] [--out runs/study_flow_grpo_vs_pec] [--set KEY=VALUE ...]

Trains two LoRAs from the `demo` preset with the same seeds and budget — Flow-GRPO (no shaping) and
PEC (default β) — then samples the base model and both LoRAs on the same training prompts and seeds
(ODE) and prints a table: mean task reward, mean per-prompt Vendi in the toy-encoder space, and the
targets of issue #4 (Flow-GRPO's Vendi ≥ 30% below the base; PEC keeps ≥ 80% of the base Vendi and
reaches ≥ 70% of Flow-GRPO's reward gain). Writes `results.md` and `results.json` in --out.
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

    results = {"base": evaluate(base_cfg.model.path, None, prompts, seeds, reward_fn, encoder)}
    for name, overrides in METHODS.items():
        cfg = load_config("demo", None, [f"train.iterations={args.iterations}", *args.set, *overrides, f"run.dir={out / name}"])
        start = time.perf_counter()
        run_dir = train(cfg)
        minutes = (time.perf_counter() - start) / 60
        results[name] = {**evaluate(cfg.model.path, run_dir / "lora.safetensors", prompts, seeds, reward_fn, encoder), "train_minutes": minutes}

    base, fg, pec = results["base"], results["flow-grpo"], results["pec"]
    checks = {
        "flow-grpo Vendi >= 30% below base": fg["vendi"] <= 0.7 * base["vendi"],
        "pec keeps >= 80% of base Vendi": pec["vendi"] >= 0.8 * base["vendi"],
        "pec reaches >= 70% of flow-grpo's reward gain": (pec["reward"] - base["reward"]) >= 0.7 * (fg["reward"] - base["reward"]),
    }
    lines = [
        f"Embedded world, demo preset, {args.iterations} iterations each, {len(prompts)} training prompts x {len(seeds)} seeds (ODE).",
        "",
        "| model | task reward | Vendi (toy encoder) | Vendi / base | train min |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['reward']:.4f} | {r['vendi']:.3f} | {r['vendi'] / base['vendi']:.2f} | "
            f"{r.get('train_minutes', 0):.1f} |"
        )
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "checks": checks}, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
