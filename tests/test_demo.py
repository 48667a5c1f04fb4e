"""`pec demo`: Flow-GRPO and PEC trained side by side (two processes) from the same seed, one report."""

import math

import pytest
from test_trainer import model_dir, tiny_overrides  # noqa: F401  (model_dir is a fixture)

from trainer.demo import demo_configs, gain_share, run_demo, side_by_side
from trainer.runlog import read_probes

PROBE = {"probe.every": 1, "probe.prompts": 1, "probe.seeds": [0, 1, 2], "probe.steps": [0, 1]}
# The report measures every training and held-out prompt: a few keep the test short.
PROMPTS = {"prompts.train": ["a red circle", "a blue square", "a green ring"], "prompts.eval": ["a yellow star"]}


def test_gain_share_is_the_share_of_the_reference_gain():
    assert gain_share(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gain_share(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # below the base model: a negative share
    assert math.isnan(gain_share(0.7, 0.5, 0.5))


def test_demo_configs_differ_only_in_the_method_and_folder(tmp_path):
    configs = demo_configs([f"run.dir={tmp_path}"])
    fg, pec = (c.model_dump() for c in configs.values())
    assert fg["pec"].pop("method") == "none" and pec["pec"].pop("method") == "pec"
    assert fg["run"].pop("dir").endswith("flow-grpo") and pec["run"].pop("dir").endswith("pec")
    assert fg == pec


@pytest.mark.parametrize("workers", [1, 2])
def test_side_by_side_returns_every_job_by_label_with_its_share_of_threads(workers):
    # min(arg, threads): each job gets its arguments and then its thread count (at least 1)
    jobs = {"a": (5,), "b": (1,), "c": (0,)}
    results = side_by_side(min, jobs, workers, desc="jobs")
    assert list(results) == ["a", "b", "c"]
    assert results["b"] == 1 and results["c"] == 0 and results["a"] >= 1


@pytest.mark.slow
def test_demo_trains_both_side_by_side_and_reports_the_paradox(model_dir, tmp_path):  # noqa: F811
    report = run_demo(tiny_overrides(model_dir, tmp_path, **PROBE, **PROMPTS), workers=2)
    text = report.read_text()
    for row in ("| base model |", "| Flow-GRPO |", "| PEC |"):
        assert row in text
    assert "measured on 3 training and 1 held-out prompts" in text
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "curves.png").is_file()
    probes = {label: read_probes(tmp_path / label) for label in ("flow-grpo", "pec")}
    for rows in probes.values():
        assert [p["iteration"] for p in rows] == [0, 1, 2, 3]
    # The closed-form policy entropy is the schedule's: one value in every probe of both methods.
    assert len({p["policy_entropy"] for rows in probes.values() for p in rows}) == 1
    # The same seed and budget: both start from the same base policy, so their first probes agree.
    first = [{k: v for k, v in rows[0].items() if k != "time_probe"} for rows in probes.values()]
    assert first[0] == first[1]
    assert (tmp_path / "flow-grpo" / "lora.safetensors").is_file() and (tmp_path / "pec" / "lora.safetensors").is_file()
