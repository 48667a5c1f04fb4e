"""Atomic, resumable checkpoints of a training run.

Layout under ``<run>/checkpoints/``: one folder per saved iteration, ``iter_000010/`` holding
``state.pt`` (LoRA weights, optimizer, EMA, RNG states, iteration, PCVAE calibration, log history),
``lora.safetensors`` (the docs/design.md §8 export) and a ``COMPLETE`` marker written last. A folder is built
under a temporary name and renamed into place, so a run killed at any moment leaves either a complete
checkpoint or an ignorable ``.tmp-*`` folder — never a half-written one that resume would trust.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from comfy_pec import PECError

MARKER = "COMPLETE"
STATE = "state.pt"
LORA = "lora.safetensors"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def save_checkpoint(
    run_dir: Path, iteration: int, state: dict[str, Any], export_lora: Callable[[Path], None], keep: int
) -> Path:
    """Write checkpoint ``iteration`` atomically; keep only the newest ``keep``. Returns its folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _name(iteration)
    tmp = root / f".tmp-{_name(iteration)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE)
        export_lora(tmp / LORA)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        (tmp / MARKER).write_text(f"{iteration}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary and unmarked folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("iter_") and (p / MARKER).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise PECError(f"{folder / STATE}: cannot read the checkpoint ({err})") from None
