"""Clip-Cov and KL-Cov (docs/design.md §6, App. C): act on the transitions of highest covariance.

Each acts on one trained step of one micro-batch, next to the clipped surrogate of :mod:`trainer.grpo`:
B transitions (samples whose group is trained), their log-probabilities under θ and advantages. The
transitions are ranked by the policy's log p_θ (``train.cov.space: native``) or by the perceptual
log p_A = -h_A (``perceptual``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from comfy_pec.sde import gaussian_kl

from .base import Method, StepInputs


def top_covariance_mask(log_prob: torch.Tensor, advantages: torch.Tensor, fraction: float) -> torch.Tensor:
    """The transitions Clip-Cov detaches and KL-Cov penalises (App. C): the top ``fraction`` by covariance.

    ``cov_i = (log p_i - mean_j log p_j)·(A_i - mean_j A_j)`` over the B transitions; the ``⌈fraction·B⌉``
    largest are selected (ties broken by index). ``log_prob`` ``[B]`` (no gradient is taken; the perceptual
    variants pass ``log p_A = -h_A``), ``advantages`` ``[B]`` → bool ``[B]``.
    """
    lp, a = log_prob.detach().float(), advantages.detach().float().to(log_prob.device)
    cov = (lp - lp.mean()) * (a - a.mean())
    count = math.ceil(fraction * cov.numel() - 1e-9)
    mask = torch.zeros_like(cov, dtype=torch.bool)
    mask[torch.topk(cov, count, sorted=False).indices] = True
    return mask


def clip_cov_detach(log_prob: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Clip-Cov: the selected transitions keep their value but give no gradient. ``[B]``, bool ``[B]`` → ``[B]``."""
    return torch.where(selected, log_prob.detach(), log_prob)


def kl_cov_penalty(kl: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """KL-Cov: ``mean_i 1[i selected]·KL_i(θ‖old)`` over all B transitions (scaled by β_cov in the loss).

    ``kl`` ``[B]`` is the step-Gaussian KL ``||μ_θ - μ_old||²/(2·std²)`` (per element), ``selected`` bool ``[B]``.
    Averaging over all B (not only the selected) keeps the penalty per transition like the surrogate's.
    """
    return (kl * selected.to(kl.dtype)).mean()


class Cov(Method):
    name = "cov"

    def __init__(self, kind: str, space: str, fraction: float, kl_beta: float):
        self.kind, self.space, self.fraction, self.kl_beta = kind, space, fraction, kl_beta
        self.uses_perceptual = space == "perceptual"
        self._selected: torch.Tensor | None = None  # of the step being trained

    @classmethod
    def from_config(cls, config) -> Cov | None:
        c = config.train.cov
        return None if c.kind == "none" else cls(c.kind, c.space, c.fraction, c.kl_beta)

    def adjust_log_prob(self, log_prob: torch.Tensor, step: StepInputs) -> torch.Tensor:
        ranked = log_prob if self.space == "native" else -step.entropy[step.mask]
        self._selected = top_covariance_mask(ranked, step.advantages, self.fraction)
        return clip_cov_detach(log_prob, self._selected) if self.kind == "clip_cov" else log_prob

    def loss(self, step: StepInputs) -> tuple[torch.Tensor | None, dict[str, Any]]:
        stats = {"cov_frac": self._selected.float().mean()}
        if self.kind != "kl_cov":
            return None, stats
        kl_old = gaussian_kl(step.result.mean, step.old_mean, step.result.std)[step.mask]
        penalty = kl_cov_penalty(kl_old, self._selected)
        return self.kl_beta * penalty, {**stats, "kl_cov": penalty.detach()}
