"""Perceptual quantities of a rollout (docs/design.md §5), measured on the stored tensors without gradient.

For every trained stochastic step the rollout buffer already holds the sampled ``x'`` and the
old-policy mean ``μ_old``. Both are decoded by the VAE and embedded by the perceptual encoder ``g``
(batched, in chunks), giving per sample and step the residual energy ``e``, the per-sample perceptual
entropy ``h_A`` and, in latent space, ``e_VAE`` (for PCVAE's gain).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from comfy_pec.perceptual import perceptual_energy, perceptual_entropy

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PerceptualStats:
    """Per sample (N) and trained step (T), float32 on the CPU.

    Attributes:
        energy: ``e = ||g(x') - g(μ_old)||² / (2·std²)`` ``[N, T]``.
        entropy: ``h_A = e + (d_f/2)·log(2π·std²)`` ``[N, T]`` (its group mean is Ĥ_A of the step).
        latent_energy: ``e_VAE = ||x' - μ_old||² / (2·std²)`` ``[N, T]``.
        feat_dim: ``d_f``, the feature dimension.
        latent_dim: ``d``, elements of one latent.
    """

    energy: torch.Tensor
    entropy: torch.Tensor
    latent_energy: torch.Tensor
    feat_dim: int
    latent_dim: int


@torch.no_grad()
def embed_latents(
    decode: Callable[[torch.Tensor], torch.Tensor], encoder: Encoder, latents: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``g(latents) = f(D(latents))`` for ``[N, ...]`` latents, ``chunk_size`` at a time → ``[N, d_f]``."""
    feats = [encoder(decode(chunk)).float() for chunk in latents.split(chunk_size)]
    return torch.cat(feats)


@torch.no_grad()
def measure_steps(
    decode: Callable[[torch.Tensor], torch.Tensor],
    encoder: Encoder,
    next_latents: torch.Tensor,
    means: torch.Tensor,
    stds: torch.Tensor,
    chunk_size: int = 32,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PerceptualStats:
    """Energies and perceptual entropy of T stochastic steps of N rollouts.

    Args:
        decode: latents → images ``[B, 3, H, W]`` in [0, 1] (the backend's VAE decode).
        encoder: images → features ``[B, d_f]`` (normalised as configured).
        next_latents: sampled ``x'`` ``[N, T, ...]``.
        means: old-policy means ``μ_old`` ``[N, T, ...]``.
        stds: ``std_step`` per step ``[T]``.
        targets: optional ``(a, b)`` ``[N, T, ...]`` to decode instead of ``(x', μ_old)`` —
            ``pec.decode: x0`` passes the clean predictions of both; the latent energy always
            uses ``x'`` and ``μ_old``.
    """
    n, t = next_latents.shape[:2]
    a, b = targets if targets is not None else (next_latents, means)
    both = torch.cat([a.flatten(0, 1), b.flatten(0, 1)])
    feats = embed_latents(decode, encoder, both, chunk_size).cpu()
    f_a, f_b = feats[: n * t], feats[n * t :]
    std = stds.float().cpu().repeat(n)  # row-major [N, T] → one std per (sample, step)
    energy = perceptual_energy(f_a, f_b, std).reshape(n, t)
    entropy = perceptual_entropy(f_a, f_b, std).reshape(n, t)
    latent = perceptual_energy(next_latents.flatten(0, 1).cpu(), means.flatten(0, 1).cpu(), std).reshape(n, t)
    return PerceptualStats(energy, entropy, latent, feat_dim=f_a.shape[1], latent_dim=next_latents[0, 0].numel())
