"""DRIFT (docs/design.md §6): diversity-incentivised GRPO in three independent parts.

(i) sampling — a reward-concentrated subset: each group's reward outliers leave the normalisation;
(ii) prompting — annealed Gaussian noise on the prompt embeddings, per sample;
(iii) optimisation — potential-based diversity shaping of the reward in the perceptual space.
The formulas are reconstructed from the paper's abstract (no public code); constants are configurable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backends.base import PromptEmbeds
from ..sampling import seeded_noise
from .base import Method, ShapeInputs

#: MAD → std of a normal distribution.
MAD_TO_STD = 1.4826


def reward_concentrated_subset(rewards: torch.Tensor, group_size: int, threshold: float) -> torch.Tensor:
    """DRIFT (i): keep the samples whose reward lies within ``threshold`` robust std of the group median.

    ``keep_i = |r_i - median_g| ≤ threshold · 1.4826 · MAD_g`` (MAD = median absolute deviation, a
    robust std). The median sample always stays. ``rewards`` ``[N]`` group-contiguous → bool ``[N]``;
    non-finite rewards are kept (their group is dropped whole by the advantage step).
    """
    r = rewards.double().reshape(-1, group_size)
    median = r.nanmedian(dim=1, keepdim=True).values
    mad = (r - median).abs().nanmedian(dim=1, keepdim=True).values
    keep = ((r - median).abs() <= threshold * MAD_TO_STD * mad) | ~torch.isfinite(r)
    return keep.reshape(-1)


def prompt_noise_std(initial: float, iteration: int, anneal_iterations: int) -> float:
    """DRIFT (ii) schedule: ``σ_p(k) = σ_0 · max(0, 1 - k / K)``, linear from σ_0 to 0 over K iterations."""
    return initial * max(0.0, 1.0 - iteration / anneal_iterations)


@dataclass
class PromptNoise:
    """DRIFT (ii) for one iteration: ``c_i + σ_p · rms(c_i) · ε_i`` on token and pooled embeddings.

    The noise is relative to each sample's embedding RMS (so σ_p means the same for every text encoder)
    and drawn from a generator seeded by that sample's entry of ``seeds`` ``[N]``, so it does not
    depend on the micro-batching. The rollout stores the noisy embeddings: the update sees them too.
    """

    std: float
    seeds: torch.Tensor

    def __call__(self, cond: PromptEmbeds, samples: slice) -> PromptEmbeds:
        gens = [torch.Generator().manual_seed(int(s)) for s in self.seeds[samples]]

        def noisy(x: torch.Tensor) -> torch.Tensor:
            eps = seeded_noise(x.shape, gens, x.device).to(x.dtype)
            rms = x.float().flatten(1).pow(2).mean(1).sqrt().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
            return x + self.std * rms * eps

        return PromptEmbeds(noisy(cond.embeds), noisy(cond.pooled))


def drift_diversity_shaping(
    rewards: torch.Tensor,
    task_rewards: torch.Tensor,
    features: torch.Tensor,
    group_size: int,
    alpha: float,
    eps: float = 1e-4,
) -> torch.Tensor:
    """DRIFT (iii), potential-based diversity shaping: ``r̃_i = r_i + α · y_i · d̂_i``.

    ``d_i = 1 - mean_{j≠i} cos(g_i, g_j)`` is sample i's mean cosine distance to the rest of its group
    in the perceptual space, ``d̂_i`` its min-max normalisation within the group (0 when all are
    equal), and ``y_i = (r_i^task - mean_g) / (std_g + eps)`` the in-group standardised task reward:
    diversity amplifies the task signal — a good, distinct sample gains, a bad, distinct one loses.
    ``rewards`` (the reward being shaped), ``task_rewards`` ``[N]``, ``features`` ``[N, D]`` → ``[N]``.
    """
    feats = torch.nn.functional.normalize(features.float(), dim=-1).reshape(-1, group_size, features.shape[-1])
    cos = feats @ feats.mT  # [groups, G, G]
    dist = 1.0 - (cos.sum(-1) - cos.diagonal(dim1=-2, dim2=-1)) / (group_size - 1)
    low, high = dist.amin(1, keepdim=True), dist.amax(1, keepdim=True)
    d_hat = torch.where(high > low, (dist - low) / (high - low).clamp_min(1e-12), 0.0)
    task = task_rewards.float().reshape(-1, group_size)
    y = (task - task.mean(1, keepdim=True)) / (task.std(1, unbiased=False, keepdim=True) + eps)
    return rewards + alpha * (y * d_hat).reshape(-1).to(rewards.dtype)


class Drift(Method):
    """DRIFT's three parts, each on its own switch (``drift.*``)."""

    name = "drift"

    def __init__(self, subset: bool, threshold: float, prompt_noise: float, anneal: int, alpha: float):
        self.subset, self.threshold = subset, threshold
        self.noise, self.anneal, self.alpha = prompt_noise, anneal, alpha
        self.uses_perceptual = alpha > 0
        self._log: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> Drift | None:
        d = config.drift
        if not (d.subset or d.prompt_noise > 0 or d.diversity_alpha > 0):
            return None
        anneal = d.prompt_noise_anneal or config.train.iterations
        return cls(d.subset, d.subset_threshold, d.prompt_noise, anneal, d.diversity_alpha)

    def prompt_noise(self, iteration: int, generator: torch.Generator, samples: int) -> PromptNoise | None:
        self._log = {}
        if self.noise == 0:
            return None
        std = prompt_noise_std(self.noise, iteration, self.anneal)
        self._log["prompt_noise_std"] = std
        return PromptNoise(std, torch.randint(2**62, (samples,), generator=generator))

    def shape(self, rewards: torch.Tensor, inputs: ShapeInputs) -> torch.Tensor:
        if self.alpha == 0:
            return rewards
        return drift_diversity_shaping(rewards, inputs.task_rewards, inputs.features, inputs.group_size, self.alpha)

    def keep(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor | None:
        if not self.subset:
            return None
        keep = reward_concentrated_subset(rewards, group_size, self.threshold)
        self._log["drift_kept_frac"] = float(keep.float().mean())
        return keep

    def log(self) -> dict[str, Any]:
        return self._log
