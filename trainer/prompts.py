"""Prompt lists for training and evaluation: built-in presets, text files, or inline lists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from comfy_pec import PECError


def _toy(split: str, extended: bool) -> Callable[[], list[str]]:
    def build() -> list[str]:
        from trainer.world import scenes as world

        return world.train_prompts(extended) if split == "train" else world.heldout_prompts(extended)

    return build


#: built-in prompt lists (the embedded world's training and held-out prompts).
PRESETS: dict[str, Callable[[], list[str]]] = {
    "toy-train": _toy("train", False),
    "toy-train-extended": _toy("train", True),
    "toy-heldout": _toy("heldout", False),
    "toy-heldout-extended": _toy("heldout", True),
}


def resolve_prompts(spec: str | list[str]) -> list[str]:
    """A preset name, a text file (one prompt per line, ``#`` comments), or a list → list of prompts."""
    if isinstance(spec, list):
        prompts = [p.strip() for p in spec if p and p.strip()]
    elif spec in PRESETS:
        prompts = PRESETS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise PECError(f"prompts {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PECError(f"prompts {spec!r}: the list is empty")
    return prompts
