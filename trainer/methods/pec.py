"""PEC and PCVAE: reward shaping with the perceptual entropy of the trained steps (docs/design.md §5).

PEC adds ``β · pec_bonus(e)`` (the group-z-scored residual energy of each trained step, averaged over the
steps); PCVAE subtracts ``β · pcvae_penalty(ℓ, c)``, the distance of the perceptual gain ℓ from its
calibration c on the LoRA-off reference policy, measured once per run and kept in checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec.perceptual import pcvae_gain, pcvae_penalty, pec_bonus
from comfy_pec.sde import stochastic_steps

from ..lora import lora_disabled
from ..rollout import Schedule, iteration_rng, perceive, rollout
from .base import Method, RunContext, ShapeInputs


class PEC(Method):
    name = "pec"
    uses_perceptual = True

    def __init__(self, beta: float, step_norm: str, bonus_clip: float | None):
        self.beta, self.step_norm, self.bonus_clip = beta, step_norm, bonus_clip

    @classmethod
    def from_config(cls, config) -> PEC | None:
        pec = config.pec
        return cls(pec.beta, pec.step_norm, pec.bonus_clip) if pec.method == "pec" else None

    def shape(self, rewards: torch.Tensor, inputs: ShapeInputs) -> torch.Tensor:
        bonus = pec_bonus(inputs.stats.energy, inputs.group_size, self.step_norm, clip=self.bonus_clip)
        return rewards + self.beta * bonus


class PCVAE(Method):
    name = "pcvae"
    uses_perceptual = True

    def __init__(self, beta: float, one_sided: bool, decode: str, chunk_size: int):
        self.beta, self.one_sided = beta, one_sided
        self.decode, self.chunk_size = decode, chunk_size
        self.calibration: torch.Tensor | None = None  # c_t per step index of the run's schedule

    @classmethod
    def from_config(cls, config) -> PCVAE | None:
        pec = config.pec
        return cls(pec.beta, pec.one_sided, pec.decode, pec.chunk_size) if pec.method == "pcvae" else None

    def setup(self, run: RunContext) -> None:
        if self.calibration is None:
            self.calibration = self.calibrate(run)

    @torch.no_grad()
    def calibrate(self, run: RunContext) -> torch.Tensor:
        """PCVAE's anchor ``c_t``: the mean gain ℓ per step of the LoRA-off policy, every step stochastic,
        on one iteration's worth of training prompts drawn with the run's seed (iteration -1)."""
        gen = iteration_rng(run.seed, -1)
        chosen = torch.randint(len(run.prompts), (run.prompts_per_iteration,), generator=gen).tolist()
        prompts = [run.prompts[c] for c in chosen for _ in range(run.group_size)]
        seeds = torch.randint(2**62, (len(prompts),), generator=gen)
        s = run.settings
        schedule = Schedule(s.sigmas, stochastic_steps("all", s.sigmas), s.noise_level)
        with lora_disabled(run.backend):
            ro = rollout(run.backend, prompts, seeds, schedule, s)
            stats = perceive(
                run.backend, run.encoder, ro, s.sigmas, s.guidance, self.decode, self.chunk_size, s.batch_size
            )
        gain = pcvae_gain(stats.energy, stats.latent_energy, stats.feat_dim, stats.latent_dim)
        # One value per step index (the last step is never stochastic): windowed runs pick theirs.
        return torch.cat([gain.mean(dim=0), gain.new_zeros(1)])

    def shape(self, rewards: torch.Tensor, inputs: ShapeInputs) -> torch.Tensor:
        s = inputs.stats
        gain = pcvae_gain(s.energy, s.latent_energy, s.feat_dim, s.latent_dim)
        return rewards - self.beta * pcvae_penalty(gain, self.calibration[inputs.steps], one_sided=self.one_sided)

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calibration = state.get("calibration")
