"""The path a GPU user takes with the real presets, rehearsed on the CPU.

Each real preset runs through the exact CLI path (``pec train --preset ... --set ...``) with the model,
reward and encoder swapped for tiny saved models of the same architectures (a diffusers SD3.5 / FLUX
pipeline directory, a transformers CLIP directory for PickScore), one iteration end to end, then
``pec eval`` and ``pec compare`` on its LoRA. Offline, the presets as shipped stop in seconds with one
line naming the missing model and the fix; a bad prompt file is reported before any model is touched;
``--dry-run`` prints the plan and exits 0 when everything is there, 1 otherwise.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainer.backends
from trainer import cli
from trainer.backends.random_init import SPECS, build_pipeline, save_pipeline

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"sd35m-pickscore": "tiny-sd3.5", "flux-dev-pickscore": "tiny-flux"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny saved pipelines of both families and a tiny CLIP (PickScore's architecture) directory."""
    import tiny_reward_models

    root = tmp_path_factory.mktemp("tiny")
    paths = {name: save_pipeline(build_pipeline(name), root / name, SPECS[name].defaults) for name in PRESETS.values()}
    paths["clip"] = tiny_reward_models.save_tiny_clip(root / "clip")
    return paths


def _swap(tiny, preset: str, run_dir: Path) -> list[str]:
    """--set options that swap the preset's weights for tiny ones and shrink one iteration to seconds."""
    sets = [
        f"model.path={tiny[PRESETS[preset]]}",
        f"rewards=[{{name: pickscore, path: {tiny['clip']}}}]",
        f"pec.encoder_path={tiny['clip']}",
        "train.iterations=1",
        "train.prompts_per_iteration=2",
        "train.group_size=2",
        "train.batch_size=2",
        "sampling.resolution=32",
        "sampling.num_steps=2",
        "report.grid_seeds=[0, 1]",
        "report.grid_prompts=2",
        f"run.dir={run_dir}",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def _pec(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_rehearsal_train_eval_compare(preset, tiny, tmp_path):
    run = tmp_path / "run"
    done = _pec("train", "--preset", preset, *_swap(tiny, preset, run))
    assert done.returncode == 0, done.stderr[-2000:]
    lora = run / "lora.safetensors"
    assert lora.is_file() and (run / "report.md").is_file()
    evals = tmp_path / "evals"
    model = str(tiny[PRESETS[preset]])
    # a model-free reward (it reads the embedded world's prompts) stands in for PickScore, whose eval path
    # takes no local weights; the PickScore tower itself measures diversity from the tiny CLIP directory
    args = ["--model", model, "--prompts", "toy-heldout", "--max-prompts", "2", "--per-prompt", "2", "--steps", "2"]
    args += ["--rewards", "toy_preference", "--encoders", f"pickscore={tiny['clip']}", "--out", str(evals)]
    done = _pec("eval", *args, "--lora", str(lora), "--base")
    assert done.returncode == 0, done.stderr[-2000:]
    done = _pec("compare", str(evals), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "vendi/pickscore" in table and f"| {PRESETS[preset]}+run |" in table  # the LoRA row, beside the base


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shipped_preset_offline_stops_fast_with_one_line(preset):
    start = time.perf_counter()
    done = _pec("train", "--preset", preset)
    seconds = time.perf_counter() - start
    assert done.returncode != 0 and seconds < 30, (seconds, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    hub_id = "black-forest-labs/FLUX.1-dev" if preset.startswith("flux") else "stabilityai/stable-diffusion-3.5-medium"
    assert hub_id in lines[0] and "not in the local hub cache" in lines[0] and "--set model.path=" in lines[0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bad_prompt_file_is_reported_before_any_model(preset, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(trainer.backends, "load_backend", no_loading)
    monkeypatch.setattr("trainer.preflight.meta_transformer", no_loading)
    bad = tmp_path / "missing.txt"
    assert cli.main(["train", "--preset", preset, "--set", f"prompts.train={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "prompts" in err[0]
    empty = tmp_path / "empty.csv"
    empty.write_text("caption\n \n")  # one blank cell
    assert cli.main(["train", "--preset", preset, "--set", f"prompts.eval={empty}#caption"]) == 2
    assert "the list is empty" in capsys.readouterr().err


def test_dry_run_plan_on_a_tiny_local_setup(tiny, tmp_path, capsys):
    swap = _swap(tiny, "sd35m-pickscore", tmp_path / "run")
    assert cli.main(["train", "--preset", "sd35m-pickscore", *swap, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "prompts: train 'pec-train': 320; eval 'pec-heldout': 104" in out
    assert f"{tiny['tiny-sd3.5']}  [local]" in out and "ready: everything is available" in out
    assert "peak GPU memory" in out and "per iteration" in out
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    # a missing reward directory: listed with its fix, exit 1, still nothing loaded
    swap[swap.index(f"rewards=[{{name: pickscore, path: {tiny['clip']}}}]")] = (
        "rewards=[{name: pickscore, path: /nope}]"
    )
    assert cli.main(["train", "--preset", "sd35m-pickscore", *swap, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "MISSING: reward pickscore /nope: no such file or directory" in out and "NOT READY: 1 missing" in out


def test_shipped_presets_plan_offline_lists_what_is_missing(capsys):
    assert cli.main(["train", "--preset", "flux-dev-pickscore", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "black-forest-labs/FLUX.1-dev  [missing]" in out and "yuvalkirstain/PickScore_v1  [missing]" in out
    assert "transformer 11.90 B" in out  # FLUX.1-dev's published config, counted on the meta device
    assert "the published flux.1-dev config" in out


def test_lora_targets_checked_against_the_family(tiny, tmp_path, capsys):
    swap = _swap(tiny, "flux-dev-pickscore", tmp_path / "run")
    assert cli.main(["train", "--preset", "flux-dev-pickscore", *swap, "--set", "lora.targets=[to_q, attn2.to_q]"]) == 2
    assert "lora.targets: attn2.to_q match no linear layer of the flux transformer" in capsys.readouterr().err


def test_missing_local_model_directory(tmp_path, capsys):
    args = ["train", "--preset", "demo", "--set", f"model.path={tmp_path / 'nope'}", "--set", f"run.dir={tmp_path}/run"]
    assert cli.main(args) == 2
    assert f"model.path {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
