"""Reward registry: named reward functions, combined with weights.

A reward maps images ``[B, 3, H, W]`` in [0, 1] and their prompts to a float32 score ``[B]``. Rewards
are built lazily (real reward models are large; issue-by-issue more are registered here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from comfy_pec import PECError

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def _toy_adherence() -> RewardFn:
    from trainer.toy.rewards import adherence_reward

    return adherence_reward


def _toy_preference() -> RewardFn:
    from trainer.toy.rewards import preference_reward

    return preference_reward


#: name -> factory building the reward function (called once per run).
REWARDS: dict[str, Callable[[], RewardFn]] = {
    "toy_adherence": _toy_adherence,
    "toy_preference": _toy_preference,
}


@dataclass
class WeightedReward:
    """``Σ_k w_k · r_k(images, prompts)``; also returns each term for the logs."""

    terms: list[tuple[str, float, RewardFn]]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: fn(images, list(prompts)).float().cpu() for name, _, fn in self.terms}
        total = sum(weight * parts[name] for name, weight, _ in self.terms)
        return total, parts


def build_reward(terms: Sequence) -> WeightedReward:
    """From config terms (objects with ``.name`` and ``.weight``)."""
    built = []
    for term in terms:
        if term.name not in REWARDS:
            raise PECError(f"unknown reward {term.name!r}; available: {', '.join(sorted(REWARDS))}")
        built.append((term.name, float(term.weight), REWARDS[term.name]()))
    return WeightedReward(built)
