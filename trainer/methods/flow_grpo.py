"""Flow-GRPO, the baseline every run builds on (docs/design.md §3-§4).

Its schedule trains the steps the window rule picks (``all``; ``steps``: Flow-GRPO-Fast's window at a
start drawn per iteration; ``sliding``: MixGRPO's window moving towards low noise), and with
``train.kl_beta > 0`` it adds ``β_KL · KL(π_θ ‖ π_ref)`` to the loss, the reference being the same model
with the LoRA switched off. Clip-Higher is the surrogate's upper clip bound (``train.clip_range_high``).
"""

from __future__ import annotations

import torch

from comfy_pec import PECError
from comfy_pec.sde import gaussian_kl, sample_window_start, stochastic_steps

from ..lora import lora_disabled
from ..rollout import RolloutSettings, Schedule
from .base import Method, RunContext, StepInputs


class FlowGRPO(Method):
    name = "flow_grpo"

    def __init__(self, window, shared_init: bool, kl_beta: float, kl_flow_grpo_compat: bool):
        self.window = window  # trainer.config.WindowConfig
        self.shared_init = shared_init
        self.kl_beta = kl_beta
        self.kl_compat = kl_flow_grpo_compat
        self.settings: RolloutSettings | None = None

    @classmethod
    def from_config(cls, config) -> FlowGRPO:
        t = config.train
        return cls(config.sampling.window, config.sampling.shared_init_noise, t.kl_beta, t.kl_flow_grpo_compat)

    def setup(self, run: RunContext) -> None:
        self.settings = run.settings
        w, trainable = self.window, len(run.settings.sigmas) - 2  # the last step is never trained
        if w.rule in ("steps", "sliding") and (w.start_max if w.rule == "steps" else 0) + w.size > trainable:
            raise PECError(
                f"sampling.window: {w.size} SDE steps from step {w.start_max if w.rule == 'steps' else 0} do not fit "
                f"the {trainable} trainable steps of a {trainable + 1}-step schedule (the last step is always ODE)"
            )

    def schedule(self, iteration: int, generator: torch.Generator) -> Schedule:
        w, s = self.window, self.settings
        if w.rule == "steps":
            start = sample_window_start(w.start_min, w.start_max, generator)
            mask = stochastic_steps("steps", s.sigmas, start=start, size=w.size)
        else:
            mask = stochastic_steps(
                w.rule, s.sigmas, size=w.size, iteration=iteration, shift_every=w.shift_every, stride=w.stride
            )
        return Schedule(s.sigmas, mask, s.noise_level, self.shared_init)

    def loss(self, step: StepInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if self.kl_beta <= 0:
            return None, {}
        with torch.no_grad(), lora_disabled(step.backend):
            v_ref = step.backend.velocity(step.x, step.sigma, step.cond, step.guidance, step.uncond)
            zero = torch.zeros_like(step.x)
            mean_ref = step.step_fn(
                step.x, v_ref, step.sigma, step.sigma_next, step.noise_level, noise=zero, sigma_1=step.sigma_1
            ).mean
        res = step.result
        kl = gaussian_kl(res.mean, mean_ref, res.scale if self.kl_compat else res.std)[step.mask].mean()
        return self.kl_beta * kl, {"kl": kl.detach()}
