"""Diversity metrics of feature sets: Vendi, feature variance, pairwise distance, diverse subsets (docs/design.md §7).

The perceptual-entropy quantities of a stochastic step live in :mod:`comfy_pec.perceptual`.

Feature tensors are ``[N, D]`` (one set of N samples) or ``[P, N, D]`` (P prompts × N samples each,
computed in one batched call); the per-set results are then a 0-d tensor or ``[P]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import PECError
from .perceptual import perceptual_energy  # noqa: F401 -- a public name here since docs/design.md §1b

__all__ = [
    "vendi_score",
    "vendi_gradient",
    "vendi_repulsion",
    "feature_variance",
    "mean_pairwise_distance",
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
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vendi score of order q: the effective number of distinct samples under a cosine kernel.

    ``VS_q = exp(log(Σ λ_i^q) / (1-q))`` (q→1: ``exp(-Σ λ log λ)``; q=0: rank; q=∞: ``1/max λ``),
    λ the eigenvalues of ``K/n`` with ``K = X̂ X̂ᵀ`` the cosine kernel of the L2-normalised features
    ``X̂`` (never centred). The non-zero eigenvalues of ``X̂ X̂ᵀ/n`` [n×n] and ``X̂ᵀ X̂/n`` [d×d] are the
    same, so the smaller form is decomposed. Eigenvalues are clamped at 0, those below ``eig_tol``
    (default ``m·eps·λ_max``, m the matrix size) are zeroed, and the rest renormalised to sum 1.
    With ``weights`` w (the samples' probabilities) λ are those of ``W^½ K W^½``, ``W = diag(w / Σw)``:
    the Vendi of the weighted population (uniform weights give ``K/n``). Differentiable in ``weights``.

    Args:
        features: ``[N, D]`` or ``[P, N, D]``; any scale (rows are normalised). A zero row counts as
            a sample with no similarity to anything (it only shrinks the trace).
        q: order, ≥ 0 (``float('inf')`` allowed).
        dtype: compute dtype; ``torch.float64`` for reference-grade values.
        eig_tol: absolute eigenvalue threshold (in units of the normalised spectrum).
        weights: ``[N]`` or ``[P, N]`` non-negative sample weights, each set's summing to > 0.
    Returns:
        0-d tensor for ``[N, D]``, ``[P]`` for ``[P, N, D]``; 1 for identical rows, N for orthogonal rows.
    """
    if q < 0 or math.isnan(q):
        raise PECError(f"Vendi order q must be >= 0, got {q}")
    x, single = _as_sets(features, dtype)
    n, d = x.shape[-2], x.shape[-1]
    x = F.normalize(x, dim=-1)
    if weights is not None:
        w = weights.to(dtype).reshape(x.shape[:-1])
        if bool((w < 0).any()) or not bool((w.sum(-1) > 0).all()):
            raise PECError("Vendi weights must be non-negative with a positive sum in every set")
        x, n = x * (w / w.sum(-1, keepdim=True)).sqrt().unsqueeze(-1), 1
    gram = x @ x.mT if x.shape[-2] <= d else x.mT @ x
    lam = torch.linalg.eigvalsh(gram / n).clamp_min(0.0)
    lam = torch.where(lam > (_eig_tol(lam) if eig_tol is None else eig_tol), lam, 0.0)
    total = lam.sum(-1, keepdim=True)
    # All-zero features have no spectrum: call that one (degenerate) sample rather than NaN.
    lam = torch.where(total > 0, lam / total.clamp_min(torch.finfo(dtype).tiny), 0.0)
    lam[..., -1] = torch.where(total[..., 0] > 0, lam[..., -1], 1.0)
    score = _hill_number(lam, q)
    return score[0] if single else score


def _eig_tol(lam: torch.Tensor) -> torch.Tensor:
    """The default threshold below which eigenvalues ``lam`` ``[..., m]`` count as zero: ``m·eps·λ_max`` per set."""
    return lam.shape[-1] * torch.finfo(lam.dtype).eps * lam.amax(-1, keepdim=True)


def _log_spectrum(members: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-expansion of ``log M`` for ``M = membersᵀ members`` (rows already scaled by √weight):
    ``(-log λ_k [P, m], vectors·u_k [P, n, m])``, both zero for eigenvalues below the :func:`vendi_score`
    threshold, so ``aᵀ log(M) b = -Σ_k (-log λ_k)(a·u_k)(b·u_k)`` over the directions M has mass in."""
    dtype = members.dtype
    if members.shape[-2] <= members.shape[-1]:
        lam, v = torch.linalg.eigh(members @ members.mT)
        # M's eigenvectors are u_k = membersᵀ v_k / √λ_k, so a·u_k = (a membersᵀ v_k) / √λ_k.
        proj = (vectors @ members.mT @ v) / lam.clamp_min(torch.finfo(dtype).tiny).sqrt().unsqueeze(-2)
    else:
        lam, u = torch.linalg.eigh(members.mT @ members)
        proj = vectors @ u
    keep = lam > _eig_tol(lam)
    neg_log = torch.where(keep, -torch.log(torch.where(keep, lam, 1.0)), 0.0)
    return neg_log, torch.where(keep.unsqueeze(-2), proj, 0.0)


def _population_sets(samples: torch.Tensor, population: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """L2-normalised ``[P, G, D]`` samples and ``[P, K, D]`` population, and whether the input was one set."""
    s, single = _as_sets(samples, dtype)
    pop, _ = _as_sets(population, dtype)
    if pop.shape[0] != s.shape[0] or pop.shape[-1] != s.shape[-1]:
        raise PECError(f"samples {tuple(samples.shape)} and population {tuple(population.shape)} do not match")
    return F.normalize(s, dim=-1), F.normalize(pop, dim=-1), single


def vendi_gradient(
    samples: torch.Tensor, population: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """How much each sample would raise the population's Vendi (order 1) by its weight: ``b_i = -x̂_iᵀ log(M) x̂_i``.

    ``∂ log VS / ∂w_i = -x̂_iᵀ (log M + I) x̂_i`` for the weighted population ``M = Σ_j w_j x̂_j x̂_jᵀ`` (Σ w = 1,
    ``x̂`` the L2-normalised features; VS = exp(-tr M log M)); the constant ``-1`` is dropped. The pooled
    population is the ``K`` members of ``population`` (weight ``1/(K+1)`` each) and the G ``samples`` as one
    more member (``1/((K+1)·G)`` each: samples sharing a start count as one draw of the population), so every
    ``x̂_i`` lies in the span of M and ``b_i`` is a finite weighted mean of ``-log λ_k`` over M's eigenvalues,
    large for samples in directions the population rarely takes. Eigenvalues below the :func:`vendi_score`
    threshold are dropped (directions with no mass).

    Args:
        samples: ``[G, D]`` or ``[P, G, D]``.
        population: ``[K, D]`` or ``[P, K, D]`` (K ≥ 1), the same P.
    Returns:
        ``[G]`` or ``[P, G]``, float32.
    """
    s, pop, single = _population_sets(samples, population, dtype)
    k, g = pop.shape[-2], s.shape[-2]
    w = torch.cat([s.new_full((k,), 1.0 / (k + 1)), s.new_full((g,), 1.0 / ((k + 1) * g))])
    neg_log, proj = _log_spectrum(torch.cat([pop, s], dim=-2) * w.sqrt().unsqueeze(-1), s)
    b = (proj**2 * neg_log.unsqueeze(-2)).sum(-1)
    return (b[0] if single else b).float()


def vendi_repulsion(
    samples: torch.Tensor, population: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """How far each sample lies along the direction in which moving its group's centre raises the population's
    Vendi (order 1): ``b_i = x̂_i · a_g``, ``a_g = -2·P_g log(M) x̂_g``.

    ``x̂_g`` is the group's normalised mean feature (its samples share a start: one member of the population),
    ``M = (Σ_j x̂_j x̂_jᵀ + x̂_g x̂_gᵀ) / (K+1)`` over the ``K`` members of ``population`` and the group, and
    ``P_g = I - x̂_g x̂_gᵀ`` keeps the move on the sphere of normalised features. ``a_g/(K+1)`` is the gradient of
    ``log VS = -tr(M log M)`` in the member's position (the ``-2w·x̂`` part of the full derivative is radial); per
    member of a population of starts, each weighted as its share of the expected reward, the ``1/(K+1)``
    cancels against that share. So the in-group spread of ``b`` is linear in the sample's own deviation
    ``x̂_i - x̂_g`` and points away from the directions the population crowds into, a direction of each start's
    own (:func:`vendi_gradient` instead rewards any sample in a rare direction, the same for every start).
    Eigenvalues below the :func:`vendi_score` threshold are dropped. Shapes as :func:`vendi_gradient`.
    """
    s, pop, single = _population_sets(samples, population, dtype)
    centre = F.normalize(s.mean(-2, keepdim=True), dim=-1)  # [P, 1, D]
    members = torch.cat([pop, centre], dim=-2) / math.sqrt(pop.shape[-2] + 1)
    neg_log, proj = _log_spectrum(members, torch.cat([s, centre], dim=-2))
    proj_s, proj_c = proj[..., :-1, :], proj[..., -1:, :]
    # x̂_iᵀ log(M) x̂_g and x̂_gᵀ log(M) x̂_g from the eigen-expansion, then the tangent projection.
    cross = -(proj_s * proj_c * neg_log.unsqueeze(-2)).sum(-1)
    self_term = -(proj_c**2 * neg_log.unsqueeze(-2)).sum(-1)
    b = -2.0 * (cross - self_term * (s * centre).sum(-1))
    return (b[0] if single else b).float()


def feature_variance(features: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Total variance ``tr(Cov(X))`` of a feature set (unbiased, N-1; 0 for a single sample).

    ``normalize=True`` L2-normalises rows first (scale-free; docs/design.md §7 reports both).
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
