"""Seconds per phase of GRPO iterations at real model sizes: flow-grpo, PEC and PCVAE in one run.

Builds a randomly initialised SD3.5-Medium or FLUX.1-dev from the published configs (no download) with
the PickScore-size reward and DINOv2-L stand-ins of ``benchmarks/gpu_smoke.py``, then runs
``trainer.train`` on that one model for each method in turn (a fresh LoRA each) and prints per method
the median seconds per phase over the iterations after the first (compilation and warm-up), images/s,
peak GPU memory, PEC's and PCVAE's iteration time and peak memory relative to flow-grpo's, and the
rollout's model FLOP utilisation: the transformer FLOPs of one guided velocity call (counted by
``torch.utils.flop_counter``) × steps × micro-batches, over the rollout's time, against the GPU's dense
bf16 peak. Random weights make the images noise; timings and memory are those of the real shapes.

    python benchmarks/train_step.py --model sd3.5-medium --group 16          # SD3.5-M, 512², group 16
    python benchmarks/train_step.py --model flux.1-dev --methods flow-grpo,pec --compile
    python benchmarks/train_step.py --tiny                                   # tiny sizes on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import (  # noqa: E402
    PHASES,
    PRESETS,
    PROMPTS,
    add_size_arguments,
    build_backend,
    model_config,
    parse_sizes,
    save_reward_models,
)

#: benchmark method -> pec.method
METHODS = {"flow-grpo": "none", "pec": "pec", "pcvae": "pcvae"}
#: dense bf16 peak FLOP/s by GPU name (vendor figures, no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@torch.no_grad()
def rollout_flops(backend, config) -> float:
    """Transformer FLOPs of one iteration's rollout: one guided velocity call × steps × micro-batches."""
    from torch.utils.flop_counter import FlopCounterMode

    s, t = config.sampling, config.train
    guidance = backend.defaults["guidance_scale"] if s.guidance_scale is None else s.guidance_scale
    latents = torch.randn(t.batch_size, *backend.latent_shape(s.resolution, s.resolution), device=backend.device)
    cond = backend.encode_prompts(PROMPTS[:1] * t.batch_size)
    with FlopCounterMode(display=False) as counter:
        backend.velocity(latents, 1.0, cond, guidance)
    steps = s.num_steps or backend.defaults["num_steps"]
    return counter.get_total_flops() * steps * (t.prompts_per_iteration * t.group_size // t.batch_size)


def run_method(method: str, backend, name: str, args, folder: Path, models: tuple[Path, Path]) -> dict[str, float]:
    """``trainer.train`` with ``method`` on ``backend``; median phase seconds, images/s, peak memory (GiB)."""
    from trainer.runlog import read_log
    from trainer.train import train

    overrides = [
        f"pec.method={METHODS[method]}",
        f"train.iterations={args.iterations}",
        f"run.dir={folder / method}",
        f"model.compile={str(args.compile).lower()}",
        "run.perceptual_stats=false",  # flow-grpo skips the perceptual phase: the ratios are PEC's real overhead
    ]
    config = model_config(name, args, folder, *models, overrides)
    if torch.cuda.is_available() and not args.tiny:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(config, backend=backend)
    backend.transformer.delete_adapters("default")  # the next method starts from a fresh LoRA
    backend.set_network(backend.transformer)
    rows = read_log(Path(config.run.dir))
    timed = rows[1:] or rows
    out = {key: statistics.median(r[key] for r in timed) for key in PHASES}
    out["images_per_s"] = args.prompts * args.group / out["time_total"]
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if config.model.device == "cuda" else float("nan")
    return out


def print_table(results: dict[str, dict[str, float]], flops: float, peak: float | None) -> None:
    phases = [p.removeprefix("time_") for p in PHASES]
    print(f"   {'method':<10}" + "".join(f"{p:>12}" for p in phases) + f"{'images/s':>10}{'peak GiB':>10}{'MFU':>8}")
    for method, r in results.items():
        mfu = f"{flops / r['time_rollout'] / peak:.1%}" if peak else "n/a"
        cells = "".join(f"{r[p]:>11.2f}s" for p in PHASES)
        print(f"   {method:<10}{cells}{r['images_per_s']:>10.2f}{r['peak_gib']:>10.1f}{mfu:>8}")
    print(
        f"   rollout: {flops / 1e12:.4g} TFLOP of transformer forwards per iteration"
        + ("" if peak else "; MFU needs a known GPU or --peak-tflops")
    )
    base = results.get("flow-grpo")
    for method, r in results.items():
        if base is not None and method != "flow-grpo":
            memory = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] > 0 else float("nan")
            print(
                f"   {method} vs flow-grpo: iteration time x{r['time_total'] / base['time_total']:.3f}, "
                f"peak memory x{memory:.3f}; perceptual phase {r['time_perceptual'] / r['time_total']:.1%} "
                "of its iteration"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=Path(__file__).stem, description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(PRESETS), default="sd3.5-medium")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: flow-grpo, pec, pcvae")
    parser.add_argument("--iterations", type=int, default=3, help="per method; the first is not timed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (model.compile)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    add_size_arguments(parser, default_group=16)
    args = parse_sizes(parser, argv)
    if args is None:
        return 2
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="pec-train-step-") as tmp:
        folder = Path(tmp)
        models = save_reward_models(folder, args.tiny)
        config = model_config(args.model, args, folder, *models)
        backend, spec = build_backend(args.model, config, args)
        params = sum(p.numel() for p in backend.transformer.parameters()) / 1e6
        print(
            f"== {args.model}{' (tiny)' if args.tiny else ''}: transformer {params:,.1f} M params, "
            f"{args.prompts} prompt(s) x group {args.group} at {args.resolution}², {config.model.dtype}, "
            f"{args.iterations} iterations per method"
        )
        flops = rollout_flops(backend, config)
        results = {method: run_method(method, backend, args.model, args, folder, models) for method in methods}
        print_table(results, flops, peak_flops(args.peak_tflops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
