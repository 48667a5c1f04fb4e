"""Policy-loss terms of the related methods (DESIGN §6): Clip-Cov, KL-Cov and entropy regularisation.

Each acts on one trained step of one micro-batch, next to the clipped surrogate of :mod:`trainer.grpo`:
B transitions (samples whose group is trained), their log-probabilities under θ, advantages, step means.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from comfy_pec.diversity import perceptual_energy

Embed = Callable[[torch.Tensor], torch.Tensor]


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


def native_entropy_bonus(next_latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Sample-based entropy estimate of a step (native entropy regularisation): ``e_θ = ||x' - μ_θ||²/(2·std²)``.

    Per element (mean over the latent dims, like ``reduction="mean"`` log-probs), so ``e_θ = -log p_θ(x') + const``.
    The closed-form entropy ``½·log(2πe·std²)`` has no gradient (std does not depend on θ); this estimate
    does, through ``μ_θ``. ``next_latents`` (the sampled x'), ``mean`` ``[B, ...]``, ``std`` broadcastable → ``[B]``.
    """
    elem = (next_latents.float() - mean.float()) ** 2 / (2.0 * std.float() ** 2)
    return elem.flatten(1).mean(dim=1)


def perceptual_entropy_bonus(
    embed: Embed, next_latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Perceptual entropy regularisation: ``mean_i ||g(x'_i) - g(μ_θ,i)||²/(2·std²)`` with gradient through g = f∘D.

    ``g(x')`` is a constant (no gradient). The decoder and encoder run ``chunk_size`` samples at a time
    and free their graphs chunk by chunk: each chunk's gradient with respect to ``μ_θ`` is taken at
    once, and the returned scalar is a surrogate whose value is the mean energy and whose gradient
    (through ``μ_θ`` into the transformer) is the exact one. ``next_latents``, ``mean`` ``[B, ...]``,
    ``std`` 0-d → scalar.
    """
    batch = mean.shape[0]
    std = std.reshape(()).detach()
    value = mean.new_zeros(())
    grad = torch.zeros_like(mean)
    for part in torch.arange(batch).split(chunk_size):
        with torch.no_grad():
            target = embed(next_latents[part])
        with torch.enable_grad():
            leaf = mean[part].detach().requires_grad_(True)
            energy = perceptual_energy(target, embed(leaf), std).sum() / batch
            (grad[part],) = torch.autograd.grad(energy, leaf)
        value = value + energy.detach()
    # value + <μ_θ, ∂e/∂μ> - its own value: forward = mean energy, backward = the chain rule into θ.
    linear = (mean * grad).sum()
    return value + linear - linear.detach()
