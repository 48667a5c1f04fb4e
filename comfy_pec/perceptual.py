"""Perceptual entropy of a stochastic sampling step and the reward shaping built on it (docs/design.md §5).

A step from ``x`` draws ``x' = μ + std·ε``; ``g = f∘D`` decodes a latent and embeds it with a perceptual
encoder. The residual energy ``e = ||g(x') - g(μ)||²/(2·std²)`` measures how far the injected noise moves
the image in feature space; its per-sample entropy ``h_A`` averages to the step's Ĥ_A. PEC rewards samples
whose energy is high within their group; PCVAE penalises a perceptual gain far from the reference's.
Energies are ``[B]`` (one step) or ``[N, T]`` (N samples, group-contiguous; T trained steps), float32.
"""

from __future__ import annotations

import math

import torch

from . import PECError

__all__ = [
    "adaptive_beta",
    "decoupled_reward",
    "perceptual_anchor",
    "perceptual_energy",
    "perceptual_entropy",
    "pcvae_gain",
    "pcvae_penalty",
    "pec_bonus",
    "relative_reward",
]


Std = float | torch.Tensor


def _std_per_sample(std: Std, batch: int, device) -> torch.Tensor:
    s = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
    if s.numel() not in (1, batch):
        raise PECError(f"std must be a scalar or have one value per sample ({batch}), got {s.numel()}")
    return s.expand(batch)


def perceptual_energy(feat_next: torch.Tensor, feat_mean: torch.Tensor, std: Std) -> torch.Tensor:
    """Residual energy of a stochastic step in a feature space: ``e = ||g(x') - g(μ_old)||² / (2·std_step²)``.

    Args:
        feat_next: ``g(x')`` ``[B, ...]`` (features of the sampled next latent).
        feat_mean: ``g(μ_old)`` ``[B, ...]`` (features of the old policy's step mean).
        std: the step's ``std_step`` — scalar or ``[B]``.
    Returns:
        ``[B]`` float32. Applied to the latents themselves (``g`` = identity) it is the
        generation-space energy ``e_VAE = ||ε||²/2`` of PCVAE.
    """
    diff = (feat_next.float() - feat_mean.float()).flatten(1)
    s = _std_per_sample(std, diff.shape[0], diff.device)
    return (diff**2).sum(-1) / (2.0 * s**2)


def perceptual_entropy(feat_next: torch.Tensor, feat_mean: torch.Tensor, std: Std) -> torch.Tensor:
    """Per-sample perceptual entropy (paper eq. S33): ``h_A = e + (d_f/2)·log(2π·std_step²)``.

    The group estimate ``Ĥ_A`` of a step is the mean of ``h_A`` over the group's samples.
    Shapes as :func:`perceptual_energy`; ``d_f`` is the number of feature elements per sample. → ``[B]``.
    """
    energy = perceptual_energy(feat_next, feat_mean, std)
    d_f = feat_next[0].numel()
    s = _std_per_sample(std, energy.shape[0], energy.device)
    return energy + 0.5 * d_f * torch.log(2.0 * math.pi * s**2)


def pcvae_gain(energy: torch.Tensor, energy_vae: torch.Tensor, feat_dim: int, latent_dim: int) -> torch.Tensor:
    """PCVAE perceptual gain (docs/design.md §5, reconstructed): ``ℓ = log(e/d_f) - log(e_VAE/d)``.

    How much the injected noise moves perception per feature dimension, relative to how much it moves
    the latent per latent dimension. ``energy``/``energy_vae`` any equal shape (e.g. ``[B]`` or
    ``[B, T]``); energies are floored at the float32 tiny value so a zero move gives a finite, very
    negative gain instead of -inf.
    """
    tiny = torch.finfo(torch.float32).tiny
    return torch.log(energy.float().clamp_min(tiny) / feat_dim) - torch.log(
        energy_vae.float().clamp_min(tiny) / latent_dim
    )


def pcvae_penalty(gain: torch.Tensor, calibration: torch.Tensor, one_sided: bool = False) -> torch.Tensor:
    """PCVAE reward penalty (docs/design.md §5): ``mean_t |ℓ_t - c_t|``, or ``mean_t max(c_t - ℓ_t, 0)`` one-sided.

    The shaped reward is ``r̃ = r - β·penalty``. ``gain`` is ``[B, T]`` (T trained steps), ``calibration``
    ``[T]`` (mean gain of the LoRA-off reference policy, measured once). → ``[B]``.
    """
    gap = gain.float() - calibration.float().to(gain.device)
    per_step = (-gap).clamp_min(0.0) if one_sided else gap.abs()
    return per_step.mean(-1)


def pec_bonus(
    energy: torch.Tensor, group_size: int, step_norm: str = "zscore", eps: float = 1e-4, clip: float | None = None
) -> torch.Tensor:
    """PEC reward bonus (paper eq. 17/19): ``agg_t(e_t)``, so that ``r̃ = r + β·pec_bonus``.

    ``energy`` is ``[N, T]`` (N = groups × ``group_size`` samples, group-contiguous; T trained steps).
    ``step_norm="zscore"`` standardises each step's energy within its group first —
    ``z = (e - mean_group) / (std_group + eps)`` — so β means the same for every encoder and schedule;
    ``"none"`` averages the raw energies (eq. 19 literally). ``clip`` (z-scores only) bounds each
    ``z`` to ``±clip`` before the mean: the samples the injected noise moves most in feature space
    (degenerate, noise-sensitive images among them) earn no more than ``clip``. → ``[N]``.
    """
    if energy.dim() != 2 or energy.shape[0] % group_size:
        raise PECError(f"energy must be [N, T] with N a multiple of group_size {group_size}, got {tuple(energy.shape)}")
    if step_norm not in ("zscore", "none"):
        raise PECError(f"step_norm must be 'zscore' or 'none', got {step_norm!r}")
    if clip is not None and step_norm != "zscore":
        raise PECError(f"clip bounds z-scores: it needs step_norm='zscore', got {step_norm!r}")
    e = energy.float()
    if step_norm == "zscore":
        e = _group_zscore(e, group_size, eps)
        if clip is not None:
            e = e.clamp(-clip, clip)
    return e.mean(dim=1)


def perceptual_anchor(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The anchor bonus: ``b_i = -||x̂_i - â_i||²`` (``= 2·cos(x_i, a_i) - 2``), with ``x̂ = x/||x||``.

    ``features`` ``[N, d_f]``: the final images of a rollout in the perceptual space; ``anchors`` ``[N, d_f]``:
    for each sample, the image the LoRA-off model draws with the ODE from the same initial noise. Within a group
    sharing a start, the samples whose noise led back towards that image rank higher, with a spread that grows
    with how far the policy has moved the start's outcome: a restoring force per start. → ``[N]`` float32 in [-4, 0].
    """
    if features.dim() != 2 or features.shape != anchors.shape:
        raise PECError(
            f"features and anchors must both be [N, d_f], got {tuple(features.shape)} and {tuple(anchors.shape)}"
        )
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    a = torch.nn.functional.normalize(anchors.float(), dim=-1)
    return -((x - a) ** 2).sum(-1)


def _group_zscore(x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """``(x - mean_group) / (std_group + eps)`` along dim 0 (groups of ``group_size`` contiguous rows,
    population std), per trailing element; ``x`` ``[N, ...]`` float → the same shape."""
    grouped = x.reshape(-1, group_size, *x.shape[1:])
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape_as(x)


def _check_reward_and_bonus(rewards: torch.Tensor, bonus: torch.Tensor, group_size: int) -> None:
    if rewards.shape != bonus.shape or rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise PECError(
            f"rewards and bonus must both be [N] with N a multiple of group_size {group_size}, "
            f"got {tuple(rewards.shape)} and {tuple(bonus.shape)}"
        )


def decoupled_reward(rewards: torch.Tensor, bonus: torch.Tensor, beta: float, group_size: int, eps: float = 1e-4):
    """PEC's decoupled combination: ``r̃ = (r - mean_group(r)) / (std_group(r) + eps) + β·b``.

    The task reward is z-scored within its group before the bonus ``b`` (:func:`pec_bonus`, itself in
    group z-score units) is added, so β is the bonus's weight relative to the reward's own in-group
    spread in every group: with the plain sum ``r + β·b`` a group whose rewards barely differ is ranked
    by the bonus alone and one with a wide spread by the reward alone. ``rewards`` and ``bonus`` are
    ``[N]``, group-contiguous; a non-finite reward stays non-finite (its group is dropped later). → ``[N]``.
    """
    _check_reward_and_bonus(rewards, bonus, group_size)
    return _group_zscore(rewards.float(), group_size, eps) + beta * bonus.float()


def relative_reward(rewards: torch.Tensor, bonus: torch.Tensor, beta: float, group_size: int) -> torch.Tensor:
    """PEC's relative combination: ``r̃ = r + β·m·b``, ``m = median over groups of std_group(r)``.

    The plain sum ``r + β·b`` with β in units of the batch's typical in-group reward spread ``m``: groups
    whose reward barely varies are still ordered by the bonus and groups with a wide spread by the
    reward (as with the sum), but the share of each kind no longer depends on the reward model's scale,
    on the seed or on how far training has sharpened the policy. Groups holding a non-finite reward are
    left out of ``m`` and stay non-finite. ``rewards``, ``bonus`` ``[N]`` group-contiguous. → ``[N]``.
    """
    _check_reward_and_bonus(rewards, bonus, group_size)
    spread = rewards.float().reshape(-1, group_size).std(dim=1, unbiased=False)
    finite = spread[torch.isfinite(spread)]
    m = finite.median() if finite.numel() else spread.new_zeros(())
    return rewards + beta * m * bonus.float()


def adaptive_beta(beta: float, diversity: float, reference: float, target: float, lr: float, lo: float, hi: float):
    """Automatic PEC β: one log-space dual-ascent step on the constraint ``diversity ≥ target·reference``.

    ``log β' = clamp(log β + lr·(log(target·reference) - log diversity), log lo, log hi)``

    β grows while the measured diversity (e.g. the diversity probe's Vendi) is below ``target`` times its
    reference (the base policy's), and shrinks while it is above — as SAC tunes its temperature to an
    entropy target or PPO its KL coefficient to a KL target; the log keeps β positive and makes the step
    relative. ``diversity`` and ``reference`` must be > 0. Returns the new β (float).
    """
    if diversity <= 0 or reference <= 0:
        raise PECError(f"adaptive_beta needs positive diversity and reference, got {diversity} and {reference}")
    step = lr * (math.log(target * reference) - math.log(diversity))
    return min(max(math.exp(math.log(beta) + step), lo), hi)
