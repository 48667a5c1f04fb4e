"""``pec train --dry-run`` and the offline pre-flight on the new families (Z-Image, Qwen-Image, FLUX.2).

Offline, each shipped preset names its family and missing model (klein: the model, since no published-size
config exists to plan from) and exits non-zero within seconds; a tiny saved Z-Image pipeline plans with exit 0.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import cli
from trainer.backends.random_init import LLM_SPECS, build_llm_pipeline, save_pipeline

ROOT = Path(__file__).resolve().parent.parent
#: preset -> (family, hub id of its model)
PRESETS = {
    "zimage-turbo-pickscore": ("zimage", "Tongyi-MAI/Z-Image-Turbo"),
    "qwen-image-pickscore": ("qwenimage", "Qwen/Qwen-Image"),
    "flux2-dev-pickscore": ("flux2", "black-forest-labs/FLUX.2-dev"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_offline_dry_run_plan_names_family_and_missing_model(preset, capsys):
    family, hub_id = PRESETS[preset]
    assert cli.main(["train", "--preset", preset, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert f"family {family};" in out and f"model                  {hub_id}  [missing]" in out
    assert f"estimate: none for family {family}" in out and "NOT READY" in out


def test_klein_offline_dry_run_names_the_missing_model(capsys):
    assert cli.main(["train", "--preset", "flux2-klein-pickscore", "--dry-run"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FLUX.2-klein" in err[0] and "not in the local hub cache" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS) + ["flux2-klein-pickscore"])
def test_shipped_preset_offline_stops_fast_with_one_line(preset):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--preset", preset],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode != 0 and seconds < 30, (seconds, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local hub cache" in lines[0] and "--set model.path" in lines[0], lines


def test_dry_run_on_a_tiny_zimage_pipeline(tmp_path, capsys):
    import tiny_reward_models

    model = save_pipeline(
        build_llm_pipeline("tiny-zimage", seed=3), tmp_path / "zimage", LLM_SPECS["tiny-zimage"].defaults
    )
    clip = tiny_reward_models.save_tiny_clip(tmp_path / "clip")
    args = ["--set", f"model.path={model}", "--set", f"rewards=[{{name: pickscore, path: {clip}}}]"]
    args += ["--set", f"pec.encoder_path={clip}", "--set", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(["train", "--preset", "zimage-turbo-pickscore", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "family zimage;" in out and f"{model}/transformer" in out and "ready: everything is available" in out
    assert not (tmp_path / "run").exists()
