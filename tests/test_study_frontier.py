"""studies/reward_diversity_frontier.py: the two frontiers' weights and points on small hand-made populations."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies"))
from reward_diversity_frontier import (  # noqa: E402
    base_reference,
    interpolate_vendi,
    population_point,
    subset_vendi,
    tilted_weights,
    vendi_optimal_weights,
)


def clusters(n_each: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Three orthogonal clusters; the first two are rewarded 1, the third 0 ([1, 3·n_each] rewards and features)."""
    feats = torch.eye(3).repeat_interleave(n_each, 0) + 0.01 * torch.randn(
        3 * n_each, 3, generator=torch.Generator().manual_seed(0)
    )
    rewards = torch.tensor([1.0] * (2 * n_each) + [0.0] * n_each)
    return rewards[None], feats[None]


def test_tilted_weights_go_from_uniform_to_the_best_samples():
    r = torch.tensor([[0.0, 0.5, 1.0]])
    assert torch.allclose(tilted_weights(r, 1e6), torch.full((1, 3), 1 / 3, dtype=torch.float64))
    assert tilted_weights(r, 1e-3)[0, 2] == pytest.approx(1.0)
    assert torch.allclose(tilted_weights(r, 0.5).sum(-1), torch.ones(1, dtype=torch.float64))


def test_both_frontiers_reach_the_whole_gain_and_the_vendi_optimal_one_never_keeps_less():
    rewards, feats = clusters()
    base = base_reference(rewards, feats)
    assert float(base["vendi"][0]) == pytest.approx(3.0, abs=0.05)
    kl = population_point(rewards, feats, tilted_weights(rewards, 0.01), base)
    assert kl["gain"] == pytest.approx(1 - 2 / 3, abs=1e-3) and kl["vendi_ratio"] == pytest.approx(2 / 3, abs=0.02)
    w = vendi_optimal_weights(feats[0], rewards[0], multiplier=20.0)
    best = population_point(rewards, feats, w[None], base)
    assert best["gain"] == pytest.approx(kl["gain"], abs=0.01) and best["vendi_ratio"] >= kl["vendi_ratio"] - 0.01
    most_diverse = population_point(rewards, feats, vendi_optimal_weights(feats[0], rewards[0], 0.0)[None], base)
    assert most_diverse["vendi_ratio"] == pytest.approx(1.0, abs=0.02)  # the clusters are balanced already


def test_subset_vendi_and_the_frontier_interpolation():
    feats = torch.eye(16)[None].repeat(2, 2, 1)  # 32 samples: two copies of 16 orthogonal rows
    assert torch.allclose(subset_vendi(feats), torch.full((2,), 16.0, dtype=torch.float64))
    points = [{"gain": 0.0, "vendi_ratio": 1.0}, {"gain": 0.2, "vendi_ratio": 0.6}]
    assert interpolate_vendi(points, 0.1) == pytest.approx(0.8)
    assert interpolate_vendi(points, 0.3) is None
