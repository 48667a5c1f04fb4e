"""Automatic PEC β (``pec.beta_target``): the dual-ascent formula, its config rules, the diversity probe in
the loop, and an exact resume of the β state."""

import math
import shutil

import pytest
import torch
from test_trainer import lora_tensors, model_dir, tiny_overrides  # noqa: F401  (model_dir is a fixture)

from comfy_pec import PECError
from comfy_pec.perceptual import adaptive_beta
from trainer.config import ConfigError, load_config
from trainer.runlog import read_log
from trainer.train import train

AUTO = {"pec.method": "pec", "pec.beta": 0.05, "pec.beta_target": 0.9, "pec.probe_prompts": 2, "pec.probe_seeds": 2}


def test_adaptive_beta_is_a_clamped_log_space_step_towards_the_target():
    # diversity at the target: β unchanged
    assert adaptive_beta(0.05, 0.9 * 3.0, 3.0, 0.9, 4.0, 0.01, 0.5) == pytest.approx(0.05)
    # below the target by a factor 0.8: log β grows by lr·log(1/0.8)
    below = adaptive_beta(0.05, 0.8 * 0.9 * 3.0, 3.0, 0.9, 4.0, 0.01, 0.5)
    assert below == pytest.approx(0.05 * 0.8**-4)
    # above it: β shrinks by the same rule
    assert adaptive_beta(0.05, 3.0, 3.0, 0.9, 2.0, 0.01, 0.5) == pytest.approx(0.05 * 0.9**2)
    # clamps
    assert adaptive_beta(0.05, 0.1, 3.0, 0.9, 4.0, 0.01, 0.5) == 0.5
    assert adaptive_beta(0.05, 30.0, 3.0, 0.9, 4.0, 0.01, 0.5) == 0.01
    with pytest.raises(PECError, match="positive"):
        adaptive_beta(0.05, 0.0, 3.0, 0.9, 4.0, 0.01, 0.5)


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        (["pec.method=pec", "pec.beta_target=0.9", "pec.beta=0.6"], r"must lie in \[pec.beta_min, pec.beta_max\]"),
    ],
)
def test_auto_beta_config_rules(overrides, rule):
    with pytest.raises(ConfigError, match=rule):
        load_config("demo", None, overrides)


def test_auto_beta_is_ignored_without_pec():
    # a preset with automatic β stays usable for a Flow-GRPO run (pec.method=none)
    load_config("demo", None, ["pec.method=none", "pec.beta_target=0.9", "pec.beta=0.6"])


@pytest.mark.parametrize("every", [1, 2])
def test_auto_beta_follows_its_formula_at_every_probe(model_dir, tmp_path, every):  # noqa: F811
    run = tmp_path / "auto"
    train(load_config("demo", None, tiny_overrides(model_dir, run, **AUTO, **{"pec.probe_every": every})))
    rows = read_log(run)
    assert len(rows) == 3
    assert ["probe_vendi" in r for r in rows] == [it % every == 0 for it in range(3)]
    # the first probe sees the base policy (the LoRA starts at zero): ratio 1 to its reference
    assert rows[0]["probe_vendi_ratio"] == pytest.approx(1.0, abs=1e-5)
    beta = AUTO["pec.beta"]
    for r in rows:
        if "probe_vendi" not in r:  # no probe this iteration: β unchanged
            assert r["beta"] == pytest.approx(beta, rel=1e-5)
            continue
        reference = r["probe_vendi"] / r["probe_vendi_ratio"]
        beta = adaptive_beta(beta, r["probe_vendi"], reference, 0.9, 4.0, 0.01, 0.5)
        assert r["beta"] == pytest.approx(beta, rel=1e-5)
        assert len(r["group_reward_std"]) == len(r["group_bonus_std"]) == 2


def test_auto_beta_resumes_exactly(model_dir, tmp_path):  # noqa: F811
    whole = tmp_path / "whole"
    train(load_config("demo", None, tiny_overrides(model_dir, whole, **AUTO)))
    # A run killed after iteration 1's checkpoint: only that checkpoint on disk.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "iter_000001", resumed / "checkpoints" / "iter_000001")
    train(load_config("demo", None, tiny_overrides(model_dir, resumed, **AUTO)))
    assert [r["iteration"] for r in read_log(resumed)] == [2]
    assert read_log(resumed)[0]["beta"] == read_log(whole)[2]["beta"]
    assert not math.isclose(read_log(whole)[2]["beta"], AUTO["pec.beta"])
    a, b = lora_tensors(whole), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
