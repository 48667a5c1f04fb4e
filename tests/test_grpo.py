"""GRPO math (docs/design.md §4) and the PEC bonus (docs/design.md §5) against hand-written formulas."""

import math

import pytest
import torch

from comfy_pec import PECError
from comfy_pec.perceptual import decoupled_reward, pec_bonus, perceptual_anchor, relative_reward
from trainer.grpo import clipped_surrogate, group_advantages


def test_group_advantages_formula():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 11.0])
    adv = group_advantages(r, 4)
    g = r.reshape(2, 4).double()
    ref = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)
    torch.testing.assert_close(adv.values, ref.reshape(-1).float())
    assert adv.trained.all() and not adv.dropped.any() and not adv.degenerate.any()


def test_group_advantages_global_std_and_clip():
    r = torch.tensor([0.0, 0.0, 0.0, 100.0, 1.0, 2.0])
    adv = group_advantages(r, 3, std_mode="global", clip=1.5)
    std = r.double().std(unbiased=False)
    ref = (r.reshape(2, 3).double() - r.reshape(2, 3).double().mean(1, keepdim=True)) / (std + 1e-4)
    torch.testing.assert_close(adv.values, ref.clamp(-1.5, 1.5).reshape(-1).float())
    assert group_advantages(torch.tensor([0.0, 100.0]), 2, clip=5.0).values.abs().max() <= 5.0


def test_nan_group_dropped_and_equal_group_skipped():
    r = torch.tensor([1.0, float("nan"), 2.0, 5.0, 5.0, 5.0, 1.0, 2.0, 4.0])
    adv = group_advantages(r, 3)
    assert adv.dropped.tolist() == [True, False, False]
    assert adv.degenerate.tolist() == [False, True, False]
    assert adv.trained.tolist() == [False] * 6 + [True] * 3
    assert torch.isfinite(adv.values).all() and (adv.values[:6] == 0).all()
    with pytest.raises(PECError):
        group_advantages(torch.ones(5), 2)


def test_clipped_surrogate_matches_ppo():
    old = torch.zeros(6)
    new = torch.tensor([0.0, 0.5, -0.5, 0.001, -0.001, 2.0])
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -2.0])
    loss, stats = clipped_surrogate(new, old, a, 0.2, 0.3)
    ratio = new.exp()
    ref = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.3)).mean()
    torch.testing.assert_close(loss, ref)
    assert float(stats["clip_frac"]) == pytest.approx(3 / 6)  # e^0.5 > 1.3, e^-0.5 < 0.8, e^2 > 1.3
    # Gradient flows only through the unclipped side: a positive advantage past 1+ε_high gives none.
    x = torch.tensor([0.5], requires_grad=True)
    clipped_surrogate(x, torch.zeros(1), torch.ones(1), 0.2, 0.2)[0].backward()
    assert x.grad.item() == 0.0


def test_perceptual_anchor_is_minus_the_squared_distance_of_the_normalised_features():
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    a = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    # cos = 1, 1/sqrt(2), -1: b = 2·cos - 2 (0 for the same direction whatever the norms, -4 for opposite ones)
    torch.testing.assert_close(perceptual_anchor(x, a), torch.tensor([0.0, math.sqrt(2) - 2, -4.0]))
    with pytest.raises(PECError, match="anchors"):
        perceptual_anchor(x, a[:2])


def test_pec_bonus_zscore_and_raw():
    e = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 0.0], [7.0, 0.0]])
    raw = pec_bonus(e, group_size=2, step_norm="none")
    torch.testing.assert_close(raw, e.mean(1))
    z = pec_bonus(e, group_size=2)
    # Within each group of 2, each step's z-scores are ±1 (population std), so each sample's mean is ±1 or 0.
    g = e.reshape(2, 2, 2)
    zs = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)
    torch.testing.assert_close(z, zs.reshape(4, 2).mean(1))
    # Scale invariance: multiplying an encoder's energies by 100 leaves the z-scored bonus unchanged.
    torch.testing.assert_close(pec_bonus(e * 100, 2), z, rtol=1e-4, atol=1e-4)
    with pytest.raises(PECError):
        pec_bonus(e, group_size=3)
    assert math.isfinite(float(pec_bonus(torch.ones(4, 3), 2).sum()))


def test_pec_bonus_clip_bounds_each_step_z_score():
    # One group of 4, two steps: an outlier sample (z = √3 at step 0) and a spread-out step 1.
    e = torch.tensor([[10.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    g = e[None]
    z = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4))[0]
    assert float(z.abs().max()) > 1.7
    clipped = pec_bonus(e, group_size=4, clip=1.0)
    torch.testing.assert_close(clipped, z.clamp(-1.0, 1.0).mean(1))
    assert float(clipped.max()) <= 1.0 and float(clipped[0]) < float(pec_bonus(e, 4)[0])
    # A clip above every |z| changes nothing; raw energies have no scale to clip against.
    torch.testing.assert_close(pec_bonus(e, 4, clip=10.0), pec_bonus(e, 4))
    with pytest.raises(PECError, match="step_norm='zscore'"):
        pec_bonus(e, 4, step_norm="none", clip=1.0)


def test_decoupled_reward_weighs_the_bonus_against_each_groups_own_reward_spread():
    r = torch.tensor([0.50, 0.51, 0.52, 0.53, 0.0, 1.0, 2.0, 3.0])  # spreads 100x apart
    b = torch.tensor([1.0, -1.0, 0.5, 0.0, 1.0, -1.0, 0.5, 0.0])
    g = r.reshape(2, 4)
    z = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)
    torch.testing.assert_close(decoupled_reward(r, b, 0.5, 4), z.reshape(-1) + 0.5 * b)
    # Both groups rank their samples the same way: the reward's scale no longer decides the bonus's weight.
    shaped = decoupled_reward(r, b, 0.5, 4).reshape(2, 4)
    assert torch.equal(shaped[0].argsort(), shaped[1].argsort())
    plain = (r + 0.5 * b).reshape(2, 4)
    assert not torch.equal(plain[0].argsort(), plain[1].argsort())
    # A NaN reward keeps its group non-finite (dropped by group_advantages), the other group is untouched.
    nan = decoupled_reward(torch.tensor([float("nan"), 0.5, 0.6, 0.7, *r[4:].tolist()]), b, 0.5, 4)
    assert not torch.isfinite(nan[:4]).any() and torch.equal(nan[4:], decoupled_reward(r, b, 0.5, 4)[4:])
    with pytest.raises(PECError, match="group_size"):
        decoupled_reward(r, b[:4], 0.5, 4)


def test_relative_reward_scales_beta_by_the_median_in_group_reward_spread():
    r = torch.tensor([0.0, 0.2, 1.0, 1.1, 5.0, 5.8, float("nan"), 1.0])  # spreads 0.1, 0.05, 0.4; one NaN group
    b = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 1.0, -1.0])
    shaped = relative_reward(r, b, 2.0, 2)
    torch.testing.assert_close(shaped[:6], r[:6] + 2.0 * 0.1 * b[:6])  # median of 0.1, 0.05, 0.4
    assert not torch.isfinite(shaped[6:]).all()
    # Scale-free: the reward x100 gives the shaped reward x100, so the same group advantages.
    torch.testing.assert_close(relative_reward(r[:6] * 100, b[:6], 2.0, 2), shaped[:6] * 100)
    with pytest.raises(PECError, match="group_size"):
        relative_reward(r, b[:4], 2.0, 2)
