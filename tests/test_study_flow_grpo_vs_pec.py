"""studies/flow_grpo_vs_pec.py: issue #18's targets judged per seed, on the means, and on held-out prompts."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies"))
from flow_grpo_vs_pec import checks, heldout_checks, judge  # noqa: E402

BASE = {"reward": 0.5, "vendi": 4.0}


def test_judge_is_vendi_over_base_and_share_of_the_seeds_flow_grpo_gain():
    j = judge(BASE, {"reward": 0.9, "vendi": 2.0}, {"reward": 0.8, "vendi": 3.6})
    assert j == pytest.approx({"flow_grpo_vendi": 0.5, "pec_vendi": 0.9, "pec_gain": 0.75})


def test_every_seed_must_pass_on_its_own():
    good = judge(BASE, {"reward": 0.9, "vendi": 2.0}, {"reward": 0.8, "vendi": 3.6})
    weak = judge(BASE, {"reward": 0.9, "vendi": 3.2}, {"reward": 0.6, "vendi": 3.6})  # no collapse, 25% of the gain
    per_seed = {100: good, 101: weak}
    means = {k: (good[k] + weak[k]) / 2 for k in good}
    ok = checks(per_seed, means)
    assert ok["seed 100: Flow-GRPO Vendi <= 0.75x base"] and ok["seed 100: PEC gain >= 60% of Flow-GRPO's"]
    assert not ok["seed 101: Flow-GRPO Vendi <= 0.75x base"] and not ok["seed 101: PEC gain >= 60% of Flow-GRPO's"]
    assert ok["mean: PEC Vendi >= 0.90x base"] and not ok["mean: PEC gain >= 75% of Flow-GRPO's"]


def test_held_out_means_get_0_05_of_slack():
    ok = heldout_checks({"flow_grpo_vendi": 0.79, "pec_vendi": 0.86, "pec_gain": 0.71})
    assert all(ok.values())
    assert not any(heldout_checks({"flow_grpo_vendi": 0.81, "pec_vendi": 0.84, "pec_gain": 0.69}).values())
