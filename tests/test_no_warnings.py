"""`pec demo` and `pec sample` print no warnings: Python warnings are errors here (``python -W error``) and the
libraries' logged warnings (diffusers' fp32-module and missing-LoRA-key messages) must not appear either."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("warn", "deprecated", "There are modules", "No LoRA keys", "should be kept in float32")


def _quiet_run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in (done.stdout + done.stderr).splitlines() if any(n.lower() in line.lower() for n in NOISE)]
    assert not noise, noise
    return done.stdout


@pytest.mark.slow
def test_demo_and_sample_with_its_lora_print_no_warnings(tmp_path):
    run = tmp_path / "demo"
    small = ["train.iterations=1", "train.prompts_per_iteration=2", "report.grid_prompts=1", "report.grid_seeds=[0, 1]"]
    _quiet_run("demo", "--set", f"run.dir={run}", *[a for s in small for a in ("--set", s)])
    lora = run / "pec" / "lora.safetensors"  # the side-by-side demo trains flow-grpo/ and pec/
    assert lora.is_file()
    out = _quiet_run(
        "sample", "--lora", str(lora), "--prompt", "a red circle", "--seeds", "0-1", "--out", str(tmp_path / "s.png")
    )
    assert "wrote" in out and (tmp_path / "s.png").is_file()
