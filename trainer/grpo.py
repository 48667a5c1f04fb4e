"""GRPO pieces (DESIGN §4): group advantages and the clipped policy-gradient surrogate."""

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
    """

    values: torch.Tensor
    dropped: torch.Tensor
    degenerate: torch.Tensor

    @property
    def trained(self) -> torch.Tensor:
        """``[N]`` bool: samples that take part in the update."""
        keep = ~(self.dropped | self.degenerate)
        return keep.repeat_interleave(self.values.shape[0] // keep.shape[0])


def group_advantages(
    rewards: torch.Tensor, group_size: int, std_mode: str = "group", clip: float = 5.0, eps: float = 1e-4
) -> Advantages:
    """``A = (r - mean_group) / (std + 1e-4)``, clipped to ``±clip``.

    ``rewards`` ``[N]`` is group-contiguous (samples ``g·G … g·G+G-1`` share a prompt). ``std`` is the
    group's (population) std, or with ``std_mode="global"`` the std over all valid rewards. A group
    holding a NaN/inf reward is dropped; a group whose rewards are all equal gets zero advantage.
    """
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise PECError(f"rewards must be [N] with N a multiple of group_size {group_size}, got {tuple(rewards.shape)}")
    r = rewards.double().reshape(-1, group_size)
    dropped = ~torch.isfinite(r).all(dim=1)
    r = torch.where(dropped[:, None], 0.0, r)
    mean = r.mean(dim=1, keepdim=True)
    degenerate = (r == r[:, :1]).all(dim=1) & ~dropped
    if std_mode == "group":
        std = r.std(dim=1, unbiased=False, keepdim=True)
    elif std_mode == "global":
        valid = r[~dropped]
        std = valid.std(unbiased=False) if valid.numel() > 1 else torch.zeros((), dtype=r.dtype)
    else:
        raise PECError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    adv = ((r - mean) / (std + eps)).clamp(-clip, clip)
    adv = torch.where((dropped | degenerate)[:, None], 0.0, adv)
    return Advantages(adv.reshape(-1).float(), dropped, degenerate)


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
