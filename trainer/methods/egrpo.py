"""E-GRPO (docs/design.md §6): entropy-adaptive merging of low-entropy steps into one SDE jump.

Steps whose entropy ½·log(2πe·std²) is below ``sampling.window.tau`` are merged into jumps
(:func:`comfy_pec.sde.egrpo_merge_steps`); each iteration trains one jump in turn, ODE elsewhere, and
every group shares its initial noise and hence its ODE prefix up to the jump.
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import MergedStep, egrpo_merge_steps, egrpo_schedule, flow_sde_stds, step_entropy

from ..rollout import Schedule
from .base import Method, RunContext


class EGRPO(Method):
    name = "egrpo"

    def __init__(self, tau: float):
        self.tau = tau
        self.jumps: list[MergedStep] = []
        self.jump: MergedStep | None = None

    @classmethod
    def from_config(cls, config) -> EGRPO | None:
        window = config.sampling.window
        return cls(window.tau) if window.rule == "egrpo" else None

    def setup(self, run: RunContext) -> None:
        sigmas, noise_level = run.settings.sigmas, run.settings.noise_level
        stds = flow_sde_stds(sigmas, noise_level)
        self.jumps = egrpo_merge_steps(stds, self.tau)
        if not self.jumps:
            entropies = ", ".join(f"{float(h):.2f}" for h in step_entropy(stds[:-1], 1))
            raise PECError(
                f"E-GRPO: no step, merged or not, reaches sampling.window.tau={self.tau} "
                f"(step entropies: {entropies}); lower tau"
            )
        self._noise_level = noise_level
        self._sigmas = sigmas

    def schedule(self, iteration: int, generator: torch.Generator) -> Schedule:
        self.jump = self.jumps[iteration % len(self.jumps)]  # every merged jump in turn, noisiest first
        sigmas, stochastic, levels = egrpo_schedule(self._sigmas, self.jump, self._noise_level)
        return Schedule(sigmas, stochastic, levels, shared_init=True)

    def log(self) -> dict[str, Any]:
        jump = self.jump
        return {"egrpo_merged_steps": list(range(jump.start, jump.start + jump.length)), "egrpo_jump_std": jump.std}
