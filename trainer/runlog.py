"""Per-iteration metrics: a JSONL file always, TensorBoard when it is installed (or required).

``log.jsonl`` holds one row per training iteration and, when the run probes, the probe's own rows
(``"probe": true``, see :mod:`trainer.probe`); :func:`read_log` and :func:`read_probes` read each kind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from comfy_pec import PECError

LOG_NAME = "log.jsonl"


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The training iterations' rows of ``run_dir``'s log."""
    return [r for r in _read_rows(run_dir) if not r.get("probe")]


def read_probes(run_dir: Path) -> list[dict[str, Any]]:
    """The probe's rows of ``run_dir``'s log (empty when the run does not probe)."""
    return [r for r in _read_rows(run_dir) if r.get("probe")]


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill: everything after it is unreliable
    return rows


class RunLog:
    """Appends one JSON object per iteration (or probe); on resume, drops rows at or past the resumed iteration."""

    def __init__(self, run_dir: Path, start_iteration: int, tensorboard: str = "auto"):
        self.path = Path(run_dir) / LOG_NAME
        self.rows = [r for r in _read_rows(run_dir) if r.get("iteration", -1) < start_iteration]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        self.writer = self._tensorboard(Path(run_dir) / "tensorboard", tensorboard)

    @staticmethod
    def _tensorboard(folder: Path, mode: str) -> Any | None:
        if mode == "off":
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode == "on":
                raise PECError("run.tensorboard is 'on' but the tensorboard package is not installed") from None
            return None
        return SummaryWriter(str(folder))

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(clean)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            prefix = "probe/" if row.get("probe") else ""
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                    self.writer.add_scalar(prefix + key, value, row["iteration"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
