"""GRPO pieces (docs/design.md §4): group advantages and the clipped policy-gradient surrogate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy_pec import PECError


@dataclass
class Advantages:
    """Per-sample advantages and what happened to each group.

    Attributes:
        values: ``[N]`` float32 advantages (0 for samples of skipped groups).
        dropped: ``[N / G]`` bool, groups with a non-finite reward (excluded from the update).
        degenerate: ``[N / G]`` bool, groups whose rewards are all equal (zero advantage, skipped).
        kept: ``[N]`` bool, samples inside their group's normalisation subset (DRIFT drops reward
            outliers; all True otherwise).
    """

    values: torch.Tensor
    dropped: torch.Tensor
    degenerate: torch.Tensor
    kept: torch.Tensor | None = None

    @property
    def trained(self) -> torch.Tensor:
        """``[N]`` bool: samples that take part in the update."""
        keep = ~(self.dropped | self.degenerate)
        trained = keep.repeat_interleave(self.values.shape[0] // keep.shape[0])
        return trained if self.kept is None else trained & self.kept


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std_mode: str = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
    keep: torch.Tensor | None = None,
) -> Advantages:
    """``A = (r - mean_group) / (std + 1e-4)``, clipped to ``±clip``.

    ``rewards`` ``[N]`` is group-contiguous (samples ``g·G … g·G+G-1`` share a prompt). ``std`` is the
    group's (population) std, or with ``std_mode="global"`` the std over all valid rewards. A group
    holding a NaN/inf reward is dropped; a group whose rewards are all equal gets zero advantage.
    ``keep`` ``[N]`` bool (DRIFT's reward-concentrated subset) restricts the mean and std to the kept
    samples of each group; the others get zero advantage and are not trained.
    """
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise PECError(f"rewards must be [N] with N a multiple of group_size {group_size}, got {tuple(rewards.shape)}")
    r = rewards.double().reshape(-1, group_size)
    dropped = ~torch.isfinite(r).all(dim=1)
    r = torch.where(dropped[:, None], 0.0, r)
    if keep is None:
        mean = r.mean(dim=1, keepdim=True)
        degenerate = (r == r[:, :1]).all(dim=1) & ~dropped
        group_std = r.std(dim=1, unbiased=False, keepdim=True)
        valid = r[~dropped]
    else:
        k = keep.reshape(-1, group_size).to(r.dtype)
        mean = (r * k).sum(dim=1, keepdim=True) / k.sum(dim=1, keepdim=True)
        group_std = ((r - mean) ** 2 * k).sum(dim=1, keepdim=True).div(k.sum(dim=1, keepdim=True)).sqrt()
        degenerate = (group_std[:, 0] == 0) & ~dropped
        valid = r[~dropped][keep.reshape(-1, group_size)[~dropped]]
    if std_mode == "group":
        std = group_std
    elif std_mode == "global":
        std = valid.std(unbiased=False) if valid.numel() > 1 else torch.zeros((), dtype=r.dtype)
    else:
        raise PECError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    adv = ((r - mean) / (std + eps)).clamp(-clip, clip)
    adv = torch.where((dropped | degenerate)[:, None], 0.0, adv)
    if keep is not None:
        adv = torch.where(keep.reshape(-1, group_size), adv, 0.0)
    return Advantages(adv.reshape(-1).float(), dropped, degenerate, keep)


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO loss of one step: ``mean(max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high)))``, ρ = exp(log p_θ - log p_old).

    All ``[B]``. Returns the scalar loss and detached statistics (ratio mean/min/max, clip fraction).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "clip_frac": ((ratio > 1.0 + clip_high) | (ratio < 1.0 - clip_low)).float().mean(),
        }
    return loss, stats
