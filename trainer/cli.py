"""The ``pec`` command line. Each subcommand lives in its own small ``_cmd_*`` function.

Heavy imports (torch, diffusers) happen inside the subcommands, so ``pec --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from comfy_pec import PECError, __version__
from comfy_pec.kinds import STEP_KIND_NAMES

_DESCRIPTION = """\
PEC: perceptual-entropy GRPO for flow-matching text-to-image models (SD3/SD3.5, FLUX.1).

Fine-tunes a model into a LoRA that raises a reward without collapsing output diversity,
and inspects, samples and evaluates such LoRAs. Run `pec COMMAND --help` for each command."""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from comfy_pec.lora_format import format_lora_info, inspect_lora

    info = inspect_lora(args.file)
    if args.json:
        import json

        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_lora_info(info))
    return 0


def _parse_seeds(text: str) -> list[int]:
    """``"0-7"`` or ``"1,5,9"`` (or a mix: ``"0-3,10"``) → list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}; use e.g. 0-7 or 1,5,9") from None
    return seeds


def _cmd_sample(args: argparse.Namespace) -> int:
    from trainer.backends import load_backend
    from trainer.grids import image_grid
    from trainer.sampling import sample_images

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            prompts += [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise PECError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    backend = load_backend(args.model, family=args.family, device=args.device)
    if args.lora:
        backend.load_lora(args.lora, scale=args.lora_scale)
    noise_level = 0.0 if args.sde == "ode" else args.noise_level
    if noise_level is None:
        noise_level = float(backend.defaults["noise_level"])
    seeds = args.seeds
    images = sample_images(
        backend,
        [p for p in prompts for _ in seeds],
        [s for _ in prompts for s in seeds],
        num_steps=args.steps,
        guidance_scale=args.cfg,
        resolution=args.resolution,
        sde=args.sde,
        noise_level=noise_level,
        batch_size=args.batch_size,
    )
    grid = image_grid(images, ncols=len(seeds), row_labels=prompts, upscale=args.upscale)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(prompts)} prompts x {len(seeds)} seeds ({images.shape[-1]} px)")
    return 0


def _run_training(config, resume: bool, dry_run: bool = False) -> int:
    import time

    from trainer.preflight import plan, preflight

    if dry_run:
        text, ready = plan(config)
        print(text)
        return 0 if ready else 1
    preflight(config)  # prompts, names, targets, run dir, disk, every weight located: before anything loads
    from trainer.train import train

    start = time.perf_counter()
    run_dir = train(config, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under accelerate launch, rank 0 tells
    minutes = (time.perf_counter() - start) / 60
    lora = run_dir / "lora.safetensors"
    print(f"done in {minutes:.1f} min (wall time)")
    print(f"  LoRA:   {lora}  (scale baked in: strength 1.0)")
    print(f"  report: {run_dir / 'report.md'}")
    print(f'  try it: pec sample --lora {lora} --prompt "a red circle"')
    print("  ComfyUI: copy the LoRA to models/loras/ and use LoraLoaderModelOnly")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    if args.resume:
        config_file = os.path.join(args.resume, "config.yaml")
        if not os.path.isfile(config_file):
            raise PECError(f"{args.resume}: no config.yaml here; not a PEC run directory")
        config = load_config(file=config_file, overrides=[f"run.dir={args.resume}", *args.set])
    else:
        if args.preset is None and args.config is None:
            raise PECError("pass --preset NAME and/or --config FILE (or --resume RUN_DIR)")
        config = load_config(args.preset, args.config, args.set)
    return _run_training(config, resume=not args.fresh, dry_run=args.dry_run)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from trainer.config import load_config

    if args.single:
        return _run_training(load_config("demo", None, args.set), resume=not args.fresh)
    from trainer.demo import run_demo

    start = time.perf_counter()
    report = run_demo(args.set, resume=not args.fresh)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (wall time)")
    print(f"  report: {report}  (base / Flow-GRPO / PEC side by side, probe curves, table)")
    print(f"  LoRAs:  {report.parent / 'flow-grpo' / 'lora.safetensors'}, {report.parent / 'pec' / 'lora.safetensors'}")
    print(f'  try it: pec sample --lora {report.parent / "pec" / "lora.safetensors"} --prompt "a red circle"')
    print("  ComfyUI: copy a LoRA to models/loras/ and use LoraLoaderModelOnly (strength 1.0)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pec", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="show what is in a LoRA file (architecture, rank, modules, provenance)",
        description="Read a LoRA safetensors file and print its architecture guess, rank, "
        "targeted modules, provenance (pec.* metadata) and usage hint. Exit code 2 on a file "
        "that is not a readable LoRA.",
    )
    p.add_argument("file", help="path to a .safetensors LoRA")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "sample",
        help="draw a grid of samples (rows: prompts, columns: seeds), base model or base + LoRA",
        description="Sample prompts at fixed seeds and save a PNG grid. Image (prompt, seed) is the same "
        "in any batch and on any device. Defaults (steps, CFG, resolution) come from the model.",
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeat for more rows)")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument(
        "--seeds", type=_parse_seeds, default=_parse_seeds("0-7"), help="seeds, e.g. 0-7 or 1,5,9 (default 0-7)"
    )
    p.add_argument("--model", help="diffusers pipeline directory or hub id (default: the embedded tiny model)")
    p.add_argument("--family", help="model family, needed for hub ids (an unknown one is an error that lists them)")
    p.add_argument("--lora", help="LoRA .safetensors to apply")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--sde", choices=STEP_KIND_NAMES, default="ode", help="sampler (default ode)")
    p.add_argument("--noise-level", type=float, help="SDE noise level a (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--upscale", type=int, default=2, help="enlarge tiles in the grid (nearest-neighbour)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.set_defaults(func=_cmd_sample)

    set_help = "override a config value, e.g. --set pec.beta=0.5 (repeatable; values parsed as YAML)"
    p = sub.add_parser(
        "train",
        help="GRPO fine-tuning with perceptual-entropy shaping; writes a LoRA and a report",
        description="Train a LoRA with Flow-GRPO and PEC/PCVAE reward shaping. The configuration is a "
        "preset, then a YAML file, then --set overrides; the resolved one is saved in the run directory. "
        "A run directory that holds a complete checkpoint is resumed automatically.",
    )
    p.add_argument("--preset", help="start from a preset (demo, sd35m-pickscore, flux-dev-pickscore)")
    p.add_argument("--config", help="YAML config file (applied over the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the run directory")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="load nothing: check the config and prompts, print every model/reward/encoder with hub id, revision, "
        "cache state and size, and estimated peak GPU memory and time per iteration; exit 0 when all is "
        "available, 1 otherwise",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "demo",
        help="the main job on the embedded tiny model: Flow-GRPO and PEC side by side, minutes on a CPU",
        description="Train Flow-GRPO and PEC from the `demo` preset (the same seed and budget) on the embedded tiny "
        "model with the shapes world's preference reward, probing both every few iterations, then write one report "
        "(runs/demo/report.md): base / Flow-GRPO / PEC images at the same seeds, the probe curves of both on shared "
        "axes, and a table of reward, Vendi and share of Flow-GRPO's gain. Prints its wall time and where the LoRAs "
        "are. --single trains PEC alone (the quick run).",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in runs/demo")
    p.add_argument("--single", action="store_true", help="train PEC alone into run.dir (no side-by-side report)")
    p.set_defaults(func=_cmd_demo)

    from trainer.toy.cli import add_cli as add_toy_cli

    add_toy_cli(sub)
    from trainer.eval_cli import add_cli as add_eval_cli

    add_eval_cli(sub)
    return parser


def _cpu_threads() -> None:
    """One intra-op thread on CPU unless PEC_CPU_THREADS says otherwise.

    The embedded model's ops are small (~1 MB tensors): with 2 threads on 2 cores, OpenMP barriers
    made a CFG forward 17x slower (2.5 s vs 0.15 s) as soon as any other process ran.
    """
    import torch

    torch.set_num_threads(int(os.environ.get("PEC_CPU_THREADS", "1")))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in {"sample", "train", "demo", "eval"}:
        _cpu_threads()
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PECError as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"pec {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
