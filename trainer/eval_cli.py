"""``pec eval`` and ``pec compare``: command-line front ends of :mod:`trainer.evaluation` and :mod:`trainer.compare`.

``add_cli(subparsers)`` registers both on the ``pec`` parser; torch and the models load inside the
commands, so ``pec --help`` stays instant.
"""

from __future__ import annotations

import argparse

from comfy_pec import PECError
from comfy_pec.kinds import STEP_KIND_NAMES


def _names(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; ``"none"`` or ``""`` → ``[]``."""
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer or 'auto', got {text!r}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluation import default_metrics, run_eval
    from .prompts import resolve_prompts

    if args.prompts is None and args.model is not None:
        raise PECError("pass --prompts (a preset, a text file) for a model other than the embedded one")
    prompts = resolve_prompts(args.prompts or "toy-heldout")
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    default_rewards, default_encoders = default_metrics(args.model)
    rewards = default_rewards if args.rewards is None else _names(args.rewards)
    encoders = default_encoders if args.encoders is None else _names(args.encoders)
    if not rewards and not encoders:
        raise PECError("no reward or encoder is registered for this model; name them with --rewards / --encoders")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") and args.model is not None else "float32")
    loras = [(path, args.lora_scale) for path in args.lora or []]
    targets = ([[]] if args.base or not loras else []) + [[lora] for lora in loras]
    if args.name and len(targets) > 1:
        raise PECError("--name names one eval directory; this call makes several (drop --name or --base)")
    made = []
    for target in targets:
        label = target[0][0] if target else "the base model"
        print(f"evaluating {label}: {len(prompts)} prompts x {args.per_prompt} samples")
        eval_dir = run_eval(
            args.model,
            target,
            prompts,
            args.per_prompt,
            args.out,
            name=args.name,
            family=args.family,
            seed_base=args.seed_base,
            sde=args.sde,
            noise_level=args.noise_level,
            num_steps=args.steps,
            guidance=args.cfg,
            resolution=args.resolution,
            batch_size=args.batch_size,
            rewards=rewards,
            encoders=encoders,
            device=device,
            dtype=dtype,
        )
        made.append(eval_dir)
        print(f"  wrote {eval_dir}/metrics.json and metrics.csv")
    print("compare: pec compare " + " ".join(str(d) for d in made))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    paths = run_compare(
        args.runs,
        args.out,
        rows_files=args.rows,
        names=_names(args.names) if args.names else None,
        quality=_names(args.quality) if args.quality else None,
        diversity=_names(args.diversity) if args.diversity else None,
        grid_prompts=args.grid_prompts,
        grid_seeds=args.grid_seeds,
        encoder=args.encoder,
        prompt_idx=args.prompt_index,
    )
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_cli(subparsers) -> None:
    """Add ``pec eval`` and ``pec compare`` to the ``pec`` subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="quality and diversity of a model and its LoRAs (N images per prompt at fixed seeds)",
        description="Sample N images per prompt at fixed seeds (image j of every prompt: seed SEED_BASE + j) "
        "and measure them: each reward's mean (quality), and per perceptual encoder the Vendi score and "
        "the feature variance (diversity), per prompt and averaged. Each model+LoRA gets its own eval "
        "directory under --out with images/, manifest.json, features.safetensors, metrics.json and "
        "metrics.csv. Re-running reuses the images already made (interrupt and resume freely; a larger "
        "--per-prompt or more prompts only samples what is new).",
        epilog="example, the embedded world: pec eval --base --lora runs/flow-grpo/lora.safetensors "
        "runs/pec/lora.safetensors --out evals/study && pec compare evals/study",
    )
    p.add_argument("--model", help="diffusers pipeline directory or hub id (default: the embedded tiny model)")
    p.add_argument("--family", help="model family, needed for hub ids (an unknown one is an error that lists them)")
    p.add_argument(
        "--lora",
        nargs="+",
        metavar="FILE",
        help="LoRA .safetensors files; each is evaluated on its own (own eval directory)",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--base", action="store_true", help="also evaluate the model without LoRA (implied without --lora)")
    p.add_argument(
        "--prompts",
        help="prompts: a built-in set (pec-heldout, pec-train, toy-heldout, ...), a text file, a table column "
        "(FILE.csv#COLUMN, .jsonl, .json, .tsv, .parquet) or a hub dataset file (hf:OWNER/NAME/PATH#COLUMN) "
        "(default for the embedded model: toy-heldout)",
    )
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--per-prompt", type=int, default=30, help="images per prompt (default 30, as the paper)")
    p.add_argument("--seed-base", type=int, default=1000, help="seed of image 0 of every prompt (default 1000)")
    p.add_argument("--sde", choices=STEP_KIND_NAMES, default="ode", help="sampler (default ode)")
    p.add_argument("--noise-level", type=float, help="SDE noise level a (default: the model's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's eval steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="images per batch, or auto (default: 32 on CPU; on CUDA 64, halved on out-of-memory)",
    )
    p.add_argument(
        "--rewards",
        help="comma-separated reward names, or none (default: the toy rewards on the "
        "embedded model, every registered non-toy reward otherwise)",
    )
    p.add_argument(
        "--encoders",
        help="comma-separated perceptual encoders NAME or NAME=WEIGHTS, or none "
        "(default: toy on the embedded model, every registered non-toy encoder otherwise)",
    )
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 for real models on CUDA, else float32)",
    )
    p.add_argument("--out", default="evals", help="folder of eval directories (default: evals)")
    p.add_argument("--name", help="eval directory name (default: <model>[+<lora>]-<hash of model, LoRA, sampler>)")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser(
        "compare",
        help="the paper's Table-1 layout for several evals: metrics, Norm.Avg, Overall, and plots",
        description="Compare eval directories (from `pec eval`): a Markdown and CSV table with every metric, "
        "the min-max normalised quality average, the diversity average and Overall (their mean; "
        "normalised across the compared methods, as in the paper), a quality-vs-diversity scatter, "
        "side-by-side sample grids and per-method similarity-matrix heatmaps. Published rows (--rows FILE.csv, "
        "e.g. docs/paper_table1.csv) join the table and the scatter.",
    )
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="an eval directory, or a folder of them (a `pec eval --out` folder, a run with eval/)",
    )
    p.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="FILE.csv",
        help="published or external results to put beside the evals (repeatable): a CSV with a method column "
        "and metric columns named as `pec eval` names them (reward names; vendi/ENCODER, variance/ENCODER); "
        "e.g. docs/paper_table1.csv, the paper's Table 1",
    )
    p.add_argument("--names", help="comma-separated method names, in order (default: each eval's label)")
    p.add_argument("--out", default="comparison", help="output folder (default: comparison)")
    p.add_argument("--quality", help="comma-separated quality columns (default: the rewards every eval has)")
    p.add_argument("--diversity", help="comma-separated diversity columns (default: Vendi and variance per encoder)")
    p.add_argument("--grid-prompts", type=int, default=4, help="prompts (rows) per method in grids.png (default 4)")
    p.add_argument("--grid-seeds", type=int, default=4, help="seeds (columns) per method in grids.png (default 4)")
    p.add_argument("--encoder", help="feature space of similarity.png (default: the first encoder)")
    p.add_argument("--prompt-index", type=int, default=0, help="prompt shown in similarity.png (default 0)")
    p.set_defaults(func=_cmd_compare)
