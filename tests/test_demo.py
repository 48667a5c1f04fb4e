"""`pec demo`: Flow-GRPO and PEC trained side by side (two processes) from the same seed, one report."""

import math

import pytest
import torch
from test_trainer import model_dir, tiny_overrides  # noqa: F401  (model_dir is a fixture)

from comfy_pec.encoders import load_encoder
from trainer.config import load_config
from trainer.demo import (
    demo_configs,
    gain_share,
    measure,
    measurement_chunks,
    merge_measurements,
    run_demo,
    side_by_side,
)
from trainer.rewards import build_reward
from trainer.runlog import read_probes

PROBE = {"probe.every": 1, "probe.prompts": 1, "probe.seeds": [0, 1, 2], "probe.steps": [0, 1]}
# The report measures every training and held-out prompt: a few keep the test short.
PROMPTS = {"prompts.train": ["a red circle", "a blue square", "a green ring"], "prompts.eval": ["a yellow star"]}


def test_gain_share_is_the_share_of_the_reference_gain():
    assert gain_share(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gain_share(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # below the base model: a negative share
    assert math.isnan(gain_share(0.7, 0.5, 0.5))


def test_demo_configs_differ_only_in_the_method_folder_and_per_iteration_stats(tmp_path):
    configs = demo_configs([f"run.dir={tmp_path}"])
    fg, pec = (c.model_dump() for c in configs.values())
    assert fg["pec"].pop("method") == "none" and pec["pec"].pop("method") == "pec"
    assert fg["run"].pop("dir").endswith("flow-grpo") and pec["run"].pop("dir").endswith("pec")
    # Flow-GRPO's training uses no perceptual quantity; the probe measures what the report plots.
    assert fg["run"].pop("perceptual_stats") is False and pec["run"].pop("perceptual_stats") is True
    assert fg == pec


@pytest.mark.parametrize("workers", [1, 2])
def test_side_by_side_runs_every_job_and_its_follow_ups_with_their_share_of_threads(workers):
    # min(arg, threads): each job gets its arguments and then its thread count (at least 1)
    jobs = {"a": (min, (5,)), "b": (min, (1,)), "c": (min, (0,))}
    finished = []
    results = side_by_side(
        jobs,
        workers,
        then=lambda key, result: {(key, "next"): (min, (result - 10,))} if key == "b" else {},
        on_done=finished.append,
    )
    assert list(results) == ["a", "b", "c", ("b", "next")]
    assert results["b"] == 1 and results["c"] == 0 and results["a"] >= 1
    assert results["b", "next"] == -9  # queued when "b" finished, with its result
    assert sorted(map(str, finished)) == sorted(map(str, results))


@pytest.mark.parametrize("workers", [1, 2])
def test_side_by_side_raises_a_jobs_error(workers):
    # int("x", threads): a ValueError in the job, raised here whether it ran here or in a worker process
    with pytest.raises(ValueError, match="base"):
        side_by_side({"good": (min, (1,)), "bad": (int, ("x",))}, workers)


def test_a_measurement_in_chunks_merges_to_the_whole(model_dir, tmp_path):  # noqa: F811
    config = load_config("demo", None, tiny_overrides(model_dir, tmp_path))
    sets = {"training": ["a red circle", "a blue square", "a green ring"], "held-out": ["a yellow star"]}
    chunks = measurement_chunks(sets, size=2)
    assert chunks == [
        {"training": ["a red circle", "a blue square"]},
        {"training": ["a green ring"]},
        {"held-out": ["a yellow star"]},
    ]
    encoder, reward_fn = load_encoder("toy", path=config.pec.encoder_path), build_reward(config.rewards)
    whole = measure(model_dir, None, sets, [0, 1, 2], encoder, reward_fn)
    merged = merge_measurements([measure(model_dir, None, c, [0, 1, 2], encoder, reward_fn) for c in chunks], chunks)
    assert merged.keys() == whole.keys()
    for name in sets:
        assert merged[name].keys() == whole[name].keys()
        torch.testing.assert_close(merged[name]["images"], whole[name]["images"])
        for key in whole[name].keys() - {"images"}:
            assert merged[name][key] == pytest.approx(whole[name][key], rel=1e-5), key


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
