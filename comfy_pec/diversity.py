"""Diversity metrics and perceptual-entropy estimators (DESIGN §5 and §7).

Feature tensors are ``[N, D]`` (one set of N samples) or ``[P, N, D]`` (P prompts × N samples each,
computed in one batched call); the per-set results are then a 0-d tensor or ``[P]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import PECError

__all__ = [
    "vendi_score",
    "feature_variance",
    "mean_pairwise_distance",
    "perceptual_energy",
    "perceptual_entropy",
    "pcvae_gain",
    "pcvae_penalty",
    "pec_bonus",
    "select_diverse",
]


def _as_sets(features: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``[N, D]`` or ``[P, N, D]`` → (``[P, N, D]`` in ``dtype``, whether to squeeze P at the end)."""
    if features.dim() not in (2, 3):
        raise PECError(f"features must be [N, D] or [P, N, D], got shape {tuple(features.shape)}")
    if features.shape[-2] == 0:
        raise PECError("features hold no samples (N = 0)")
    single = features.dim() == 2
    x = features.to(dtype)
    return (x.unsqueeze(0) if single else x), single


def _hill_number(p: torch.Tensor, q: float) -> torch.Tensor:
    """Hill number of order q of distributions ``p`` [..., m] (rows sum to 1, zeros allowed):
    ``exp(log(Σ p^q) / (1-q))``; the limits q→1 (``exp(-Σ p log p)``), q=0 (support size) and
    q=∞ (``1/max p``) are taken exactly."""
    positive = p > 0
    if q == 1.0:
        plogp = torch.where(positive, p * torch.log(torch.where(positive, p, 1.0)), 0.0)
        return torch.exp(-plogp.sum(-1))
    if q == 0.0:
        return positive.sum(-1).to(p.dtype)
    if math.isinf(q):
        return 1.0 / p.amax(-1)
    powered = torch.where(positive, torch.where(positive, p, 1.0) ** q, 0.0)
    return torch.exp(torch.log(powered.sum(-1)) / (1.0 - q))


def vendi_score(
    features: torch.Tensor,
    q: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    eig_tol: float | None = None,
) -> torch.Tensor:
    """Vendi score of order q: the effective number of distinct samples under a cosine kernel.

    ``VS_q = exp(log(Σ λ_i^q) / (1-q))`` (q→1: ``exp(-Σ λ log λ)``; q=0: rank; q=∞: ``1/max λ``),
    λ the eigenvalues of ``K/n`` with ``K = X̂ X̂ᵀ`` the cosine kernel of the L2-normalised features
    ``X̂`` (never centred). The non-zero eigenvalues of ``X̂ X̂ᵀ/n`` [n×n] and ``X̂ᵀ X̂/n`` [d×d] are the
    same, so the smaller form is decomposed. Eigenvalues are clamped at 0, those below ``eig_tol``
    (default ``m·eps·λ_max``, m the matrix size) are zeroed, and the rest renormalised to sum 1.

    Args:
        features: ``[N, D]`` or ``[P, N, D]``; any scale (rows are normalised). A zero row counts as
            a sample with no similarity to anything (it only shrinks the trace).
        q: order, ≥ 0 (``float('inf')`` allowed).
        dtype: compute dtype; ``torch.float64`` for reference-grade values.
        eig_tol: absolute eigenvalue threshold (in units of the normalised spectrum).
    Returns:
        0-d tensor for ``[N, D]``, ``[P]`` for ``[P, N, D]``; 1 for identical rows, N for orthogonal rows.
    """
    if q < 0 or math.isnan(q):
        raise PECError(f"Vendi order q must be >= 0, got {q}")
    x, single = _as_sets(features, dtype)
    n, d = x.shape[-2], x.shape[-1]
    x = F.normalize(x, dim=-1)
    gram = x @ x.mT if n <= d else x.mT @ x
    lam = torch.linalg.eigvalsh(gram / n).clamp_min(0.0)
    tol = lam.shape[-1] * torch.finfo(dtype).eps * lam.amax(-1, keepdim=True) if eig_tol is None else eig_tol
    lam = torch.where(lam > tol, lam, 0.0)
    total = lam.sum(-1, keepdim=True)
    # All-zero features have no spectrum: call that one (degenerate) sample rather than NaN.
    lam = torch.where(total > 0, lam / total.clamp_min(torch.finfo(dtype).tiny), 0.0)
    lam[..., -1] = torch.where(total[..., 0] > 0, lam[..., -1], 1.0)
    score = _hill_number(lam, q)
    return score[0] if single else score


def feature_variance(features: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Total variance ``tr(Cov(X))`` of a feature set (unbiased, N-1; 0 for a single sample).

    ``normalize=True`` L2-normalises rows first (scale-free; DESIGN §7 reports both).
    ``[N, D]`` → 0-d, ``[P, N, D]`` → ``[P]`` (float32, or float64 for float64 input).
    """
    x, single = _as_sets(features, torch.promote_types(features.dtype, torch.float32))
    if normalize:
        x = F.normalize(x, dim=-1)
    n = x.shape[-2]
    centred = x - x.mean(dim=-2, keepdim=True)
    var = (centred**2).sum(dim=(-2, -1)) / max(n - 1, 1)
    return var[0] if single else var


def mean_pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance over distinct pairs: ``1 - mean_{i≠j} cos(x_i, x_j)`` (0 for N = 1).

    ``[N, D]`` → 0-d, ``[P, N, D]`` → ``[P]``.
    """
    x, single = _as_sets(features, torch.promote_types(features.dtype, torch.float32))
    n = x.shape[-2]
    x = F.normalize(x, dim=-1)
    summed = x.sum(dim=-2)
    # Σ_{i≠j} cos = ||Σ x̂_i||² - Σ ||x̂_i||² (O(N·D), no N×N matrix).
    off_diag = (summed**2).sum(-1) - (x**2).sum(dim=(-2, -1))
    dist = 1.0 - off_diag / max(n * (n - 1), 1) if n > 1 else torch.zeros_like(off_diag)
    return dist[0] if single else dist


# --------------------------------------------------------------------------------------------------
# Perceptual entropy (DESIGN §5)
# --------------------------------------------------------------------------------------------------

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
    """PCVAE perceptual gain (DESIGN §5, reconstructed): ``ℓ = log(e/d_f) - log(e_VAE/d)``.

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
    """PCVAE reward penalty (DESIGN §5): ``mean_t |ℓ_t - c_t|``, or ``mean_t max(c_t - ℓ_t, 0)`` one-sided.

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
        grouped = e.reshape(-1, group_size, e.shape[1])
        mean = grouped.mean(dim=1, keepdim=True)
        std = grouped.std(dim=1, unbiased=False, keepdim=True)
        e = ((grouped - mean) / (std + eps)).reshape_as(e)
        if clip is not None:
            e = e.clamp(-clip, clip)
    return e.mean(dim=1)


# --------------------------------------------------------------------------------------------------
# Diverse subset
# --------------------------------------------------------------------------------------------------


def select_diverse(features: torch.Tensor, k: int, q: float = 1.0) -> torch.Tensor:
    """Greedy k-of-n subset maximising the Vendi score of order q.

    Starts from the sample least similar on average to the others, then repeatedly adds the candidate
    whose addition gives the highest Vendi score (all candidates scored in one batched call).
    ``features`` ``[N, D]`` → LongTensor ``[k]`` of indices in selection order.
    """
    if features.dim() != 2:
        raise PECError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= k <= n:
        raise PECError(f"k must be between 1 and the number of samples ({n}), got {k}")
    x = F.normalize(features.float(), dim=-1)
    chosen = [int((x @ x.T).mean(-1).argmin())]
    while len(chosen) < k:
        rest = torch.tensor([i for i in range(n) if i not in chosen])
        sets = torch.cat([x[chosen].expand(len(rest), -1, -1), x[rest].unsqueeze(1)], dim=1)
        chosen.append(int(rest[vendi_score(sets, q).argmax()]))
    return torch.tensor(chosen, dtype=torch.long)
