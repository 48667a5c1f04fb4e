"""`studies/method_suite.py` end to end on a tiny budget: 2 methods, 1 iteration, 2 prompts × 2 samples."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _study():
    spec = importlib.util.spec_from_file_location("method_suite", ROOT / "studies" / "method_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_method_suite_trains_evaluates_and_writes_the_table(tmp_path):
    study = _study()
    tiny = [
        "train.prompts_per_iteration=1",
        "train.group_size=2",
        "train.batch_size=2",
        "run.progress=false",
        'run.tensorboard="off"',
        "report.grid_prompts=1",
        "report.grid_seeds=[0]",
    ]
    argv = [
        "--methods",
        "flow-grpo,mixgrpo",
        "--iterations",
        "1",
        "--prompts",
        "2",
        "--per-prompt",
        "2",
        "--out",
        str(tmp_path),
    ] + [a for s in tiny for a in ("--set", s)]
    out = study.main(argv)
    for name in ("table.md", "table.csv", "tradeoff.png", "grids.png", "curves.png", "study.json"):
        assert (out / name).is_file(), name
    with open(out / "table.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["base", "flow-grpo", "mixgrpo"]
    assert all(r["overall"] for r in rows)
    assert (out / "runs" / "mixgrpo" / "lora.safetensors").is_file()


def test_method_suite_lists_every_method_of_the_issue():
    assert list(_study().METHODS) == [
        "flow-grpo",
        "pec",
        "pcvae",
        "kl",
        "clip-higher",
        "entropy-native",
        "entropy-perceptual",
        "clip-cov",
        "kl-cov",
        "cps",
        "mixgrpo",
        "e-grpo",
        "drift",
    ]
