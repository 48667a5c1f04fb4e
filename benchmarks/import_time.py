"""How much importing the PEC library (and the ComfyUI entry) adds on top of torch's own import.

    python benchmarks/import_time.py [--repeats 7]

Each variant runs in a fresh interpreter; the best of ``--repeats`` is kept, and the difference to a
plain ``import torch`` is the figure (target: < 0.3 s for the library, issue #2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "torch only": "import torch",
    "comfy_pec (sde, diversity, lora_format)": "import torch, comfy_pec.sde, comfy_pec.diversity, comfy_pec.lora_format",
    "comfy_pec.nodes (ComfyUI start-up)": "import torch, comfy_pec.nodes",
}


def best_time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base = best_time(VARIANTS["torch only"], args.repeats)
    print(f"{'torch only':42s} {base:6.3f} s")
    for name, code in list(VARIANTS.items())[1:]:
        t = best_time(code, args.repeats)
        print(f"{name:42s} {t:6.3f} s   (+{t - base:.3f} s over torch)")


if __name__ == "__main__":
    main()
