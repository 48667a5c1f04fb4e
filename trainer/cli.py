"""The ``pec`` command line. Each subcommand lives in its own small ``_cmd_*`` function.

Heavy imports (torch, diffusers) happen inside the subcommands, so ``pec --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from comfy_pec import PECError, __version__

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
