"""Entropy regularisation (docs/design.md §6): loss − β_H·mean(e_θ), e_θ a sample-based entropy estimate.

``native``: ``e_θ = ||x' - μ_θ||²/(2·std²)`` in the latent space; ``perceptual``: the same in the perceptual
encoder's space, with the gradient through the VAE decoder and the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from comfy_pec.perceptual import perceptual_energy

from .base import Method, RunContext, StepInputs

Embed = Callable[[torch.Tensor], torch.Tensor]


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


class EntropyReg(Method):
    name = "entropy_reg"

    def __init__(self, kind: str, beta: float, chunk_size: int):
        self.kind, self.beta, self.chunk_size = kind, beta, chunk_size
        self.embed: Embed | None = None

    @classmethod
    def from_config(cls, config) -> EntropyReg | None:
        reg = config.train.entropy_reg
        return None if reg.kind == "none" else cls(reg.kind, reg.beta, reg.chunk_size)

    def setup(self, run: RunContext) -> None:
        backend, encoder = run.backend, run.encoder
        self.embed = lambda z: encoder(backend.decode(z))

    def loss(self, step: StepInputs) -> tuple[torch.Tensor | None, dict[str, Any]]:
        mask, res = step.mask, step.result
        next_latents, mean = step.next_latents[mask], res.mean[mask]
        if self.kind == "native":
            bonus = native_entropy_bonus(next_latents, mean, res.std).mean()
        else:
            bonus = perceptual_entropy_bonus(self.embed, next_latents, mean, res.std, self.chunk_size)
        return -(self.beta * bonus), {"entropy_reg": bonus.detach()}
