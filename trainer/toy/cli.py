"""``pec toy ...``: retrain the embedded tiny model and the toy perceptual encoder, and evaluate.

``add_cli(subparsers)`` registers the ``toy`` command group on the ``pec`` parser; heavy imports
happen inside the subcommands.
"""

from __future__ import annotations

import argparse
import json

from .encoder_train import DEFAULT_ENCODER_PATH, ENCODER_TRAIN_DEFAULTS
from .model import DEFAULT_MODEL_DIR
from .pretrain import PRETRAIN_DEFAULTS


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from .pretrain import pretrain

    keys = [k for k in PRETRAIN_DEFAULTS if getattr(args, k, None) is not None]
    report = pretrain(
        args.out,
        **{k: getattr(args, k) for k in keys},
        device=args.device,
        workers=args.workers,
        init_from=args.init_from,
    )
    print(json.dumps(report, indent=2))
    print(f"saved the pipeline to {args.out} ({report['time_s']['total'] / 60:.1f} min)")
    return 0


def _cmd_train_encoder(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from .encoder_train import train_encoder

    keys = [k for k in ENCODER_TRAIN_DEFAULTS if getattr(args, k, None) is not None]
    report = train_encoder(args.out, **{k: getattr(args, k) for k in keys}, device=args.device, workers=args.workers)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from .evaluate import evaluate_toy_model

    report = evaluate_toy_model(
        args.model,
        args.prompt or None,
        n=args.n,
        seed=args.seed,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}, indent=2))
    return 0


def _add_common(p: argparse.ArgumentParser, out_default) -> None:
    p.add_argument("--out", default=str(out_default), help=f"output (default: {out_default})")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="processes that render the data set (default: 2)")


def _add_recipe(p: argparse.ArgumentParser, defaults: dict, skip=()) -> None:
    """One ``--flag`` per recipe entry; unset flags keep the recipe's value (shown in --help)."""
    for key, value in defaults.items():
        if key in skip:
            continue
        p.add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            type=type(value),
            default=None,
            metavar=type(value).__name__.upper(),
            help=f"default: {value}",
        )


def add_cli(subparsers) -> None:
    """Add ``pec toy {pretrain, train-encoder, evaluate}`` to the ``pec`` subparsers."""
    toy = subparsers.add_parser(
        "toy",
        help="the embedded shapes world: retrain its tiny model and encoder, evaluate",
        description="The embedded shapes world. `pretrain` retrains the tiny SD3-architecture "
        "model that ships in trainer/toy/pretrained from scratch (about an hour on 2 CPU "
        "cores); `train-encoder` retrains the toy perceptual encoder (comfy_pec/assets); "
        "`evaluate` measures prompt adherence and relative Vendi diversity.",
    )
    sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)

    p = sub.add_parser(
        "pretrain",
        help="retrain the embedded tiny model from scratch",
        description="Render the shapes data set, train the VAE, then the "
        "transformer and both text encoders (rectified flow, EMA) and save a "
        "StableDiffusion3Pipeline directory with pec.json sampling defaults.",
    )
    _add_common(p, DEFAULT_MODEL_DIR)
    _add_recipe(p, PRETRAIN_DEFAULTS)
    p.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="continue from a saved toy pipeline: keep its VAE, train its flow model "
        "for --steps more steps (a long pre-training in several sittings)",
    )
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "train-encoder",
        help="retrain the toy perceptual encoder",
        description="Train the small CNN behind `load_encoder('toy')` on the "
        "shapes world and report linear-probe accuracies of shape and colour.",
    )
    _add_common(p, DEFAULT_ENCODER_PATH)
    _add_recipe(p, ENCODER_TRAIN_DEFAULTS)
    p.set_defaults(func=_cmd_train_encoder)

    p = sub.add_parser(
        "evaluate",
        help="adherence and relative Vendi of a toy model",
        description="Sample N images per prompt (default: the held-out prompts) "
        "and compare adherence and Vendi (toy-encoder space) with the data.",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("-n", type=int, default=64, help="samples per prompt (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: pec.json)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG (default: pec.json)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.set_defaults(func=_cmd_evaluate)
