"""PEC and PCVAE: reward shaping with the perceptual entropy of the trained steps (docs/design.md §5).

PEC adds ``β · b``: by default ``pec_bonus(e)`` (the group-z-scored residual energy of each trained step,
averaged over the steps); with ``pec.bonus: vendi`` or ``repulsion`` a per-sample Vendi gradient of the final image
against an ODE population of its prompt sampled by the current policy; with ``pec.bonus: anchor`` minus the squared
distance of the final image from the LoRA-off model's ODE image of the same start. β fixed or automatic.
PCVAE subtracts ``β · pcvae_penalty(ℓ, c)``, the distance of the perceptual gain ℓ from its calibration c on the
LoRA-off reference policy, measured once per run and kept in checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from comfy_pec.diversity import vendi_gradient, vendi_repulsion, vendi_score
from comfy_pec.perceptual import (
    adaptive_beta,
    decoupled_reward,
    pcvae_gain,
    pcvae_penalty,
    pec_bonus,
    perceptual_anchor,
    relative_reward,
)
from comfy_pec.sde import stochastic_steps

from ..lora import lora_disabled
from ..perceptual import embed_latents
from ..rollout import Schedule, iteration_rng, perceive, rollout
from ..sampling import sample_images
from .base import Method, RunContext, ShapeInputs

#: ``pec.bonus`` values measured against an ODE population of the drawn prompt: (samples, population) → bonus
POPULATION_BONUSES = {"vendi": vendi_gradient, "repulsion": vendi_repulsion}


@dataclass(frozen=True)
class AutoBeta:
    """The automatic β's settings (``pec.beta_target`` and the ``pec.beta_*`` / ``pec.probe_*`` keys)."""

    target: float
    lr: float
    lo: float
    hi: float
    prompts: int
    seeds: int
    every: int


class PEC(Method):
    """PEC's bonus at a fixed β, or at the automatic β: before every ``probe_every``-th iteration the current
    policy samples fixed training prompts and seeds with the ODE, and β takes one
    :func:`~comfy_pec.perceptual.adaptive_beta` step towards holding their per-prompt Vendi at ``beta_target``
    times the base policy's (measured at the first probe). β and that reference are kept in checkpoints."""

    name = "pec"
    uses_perceptual = True

    def __init__(
        self,
        beta: float,
        step_norm: str,
        bonus_clip: float | None,
        auto: AutoBeta | None = None,
        combine: str = "sum",
        control: str = "none",
        bonus: str = "energy",
        population: int = 8,
    ):
        self.beta, self.step_norm, self.bonus_clip, self.auto = beta, step_norm, bonus_clip, auto
        self.combine, self.control, self.bonus, self.population = combine, control, bonus, population
        # A population bonus needs the final images' features only: the trained steps are not decoded.
        self.uses_perceptual, self.uses_features = bonus == "energy", bonus in (*POPULATION_BONUSES, "anchor")
        self._iteration = 0
        self.reference: float | None = None  # the base policy's probe Vendi
        self.prompt_reference: torch.Tensor | None = None  # population bonus: the base's Vendi per training prompt
        self._run: RunContext | None = None
        self._log: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> PEC | None:
        pec = config.pec
        if pec.method != "pec":
            return None
        auto = None
        if pec.beta_target is not None:
            p = pec
            auto = AutoBeta(
                p.beta_target, p.beta_lr, p.beta_min, p.beta_max, p.probe_prompts, p.probe_seeds, p.probe_every
            )
        return cls(
            pec.beta, pec.step_norm, pec.bonus_clip, auto, pec.combine, pec.bonus_control, pec.bonus, pec.population
        )

    def setup(self, run: RunContext) -> None:
        self._run = run
        if self.auto is not None and self.bonus in POPULATION_BONUSES:
            if self.prompt_reference is None:
                self.prompt_reference = self._base_prompt_vendi()
        elif self.auto is not None:
            # The probe's prompts and seeds, drawn once for the run from its own generator (-1 is PCVAE's).
            gen = iteration_rng(run.seed, -2)
            chosen = torch.randperm(len(run.prompts), generator=gen)[: self.auto.prompts].tolist()
            seeds = torch.randint(2**31, (self.auto.seeds,), generator=gen).tolist()
            self._probe_prompts = [run.prompts[c] for c in chosen for _ in seeds]
            self._probe_seeds = [x for _ in chosen for x in seeds]

    def begin_iteration(self, iteration: int) -> None:
        self._log, self._iteration = {}, iteration
        if self.auto is None or iteration % self.auto.every or self.bonus in POPULATION_BONUSES:
            return
        start = time.perf_counter()
        if self.reference is None:
            with lora_disabled(self._run.backend):
                self.reference = self._probe_vendi()
        vendi = self._probe_vendi()
        a = self.auto
        self.beta = adaptive_beta(self.beta, vendi, self.reference, a.target, a.lr, a.lo, a.hi)
        self._log = {
            "probe_vendi": vendi,
            "probe_vendi_ratio": vendi / self.reference,
            "time_beta_probe": time.perf_counter() - start,
        }

    @torch.no_grad()
    def _policy_features(self, prompts: list[str], seeds: list[int], num_steps: int | None = None) -> torch.Tensor:
        """Perceptual features ``[n, d_f]`` of the current policy's ODE samples, prompt i with seed i
        (``num_steps`` ``None``: the model's evaluation steps)."""
        run, s = self._run, self._run.settings
        images = sample_images(
            run.backend,
            prompts,
            seeds,
            num_steps=num_steps,
            resolution=s.resolution,
            guidance_scale=s.guidance,
            batch_size=s.batch_size,
            progress=False,
        )
        return embed_latents(lambda x: x, run.encoder, images.to(run.backend.device), s.batch_size).cpu()

    def _probe_vendi(self) -> float:
        """Mean per-prompt Vendi (perceptual space) of the current policy's ODE samples of the probe's fixed
        training prompts and seeds — free of the training rollout's window and prompt draws."""
        features = self._policy_features(self._probe_prompts, self._probe_seeds)
        return float(vendi_score(features.reshape(-1, self.auto.seeds, features.shape[-1])).mean())

    def _population_bonus(self, inputs: ShapeInputs) -> torch.Tensor:
        """:data:`POPULATION_BONUSES`' ``pec.bonus`` of every sample ``[N]`` against ``pec.population`` ODE
        samples of its group's prompt by the current policy (the one that drew the rollout), from independent
        starts drawn anew each iteration: the population the evaluation's Vendi measures, which the group's
        shared start cannot show."""
        k, steps = self.population, self._run.settings.num_steps
        gen = iteration_rng(self._run.seed, -(1 << 20) - self._iteration)  # a stream of its own, replayed on resume
        ids = inputs.prompt_ids
        seeds = torch.randint(2**31, (len(ids) * k,), generator=gen).tolist()
        population = self._policy_features([self._run.prompts[i] for i in ids for _ in range(k)], seeds, steps)
        d = population.shape[-1]
        if self.prompt_reference is not None:
            self._steer_beta(population.reshape(-1, k, d), ids)
        samples = inputs.features.reshape(-1, inputs.group_size, d)
        bonus = POPULATION_BONUSES[self.bonus](samples, population.reshape(-1, k, d))
        return bonus.reshape(-1).to(inputs.task_rewards.device)

    def _anchor_bonus(self, inputs: ShapeInputs) -> torch.Tensor:
        """:func:`~comfy_pec.perceptual.perceptual_anchor` of every sample ``[N]`` against the LoRA-off model's ODE
        image from the sample's initial noise: one image per group when the group shares its start, else one per
        sample. Logs the mean squared distance (``anchor_distance``): how far the policy has moved the outcomes."""
        run, g = self._run, inputs.group_size
        starts = inputs.start_seeds.reshape(-1, g)
        per_group = bool((starts == starts[:, :1]).all())
        seeds = (starts[:, 0] if per_group else starts.reshape(-1)).tolist()
        prompts = [run.prompts[i] for i in inputs.prompt_ids for _ in range(1 if per_group else g)]
        with lora_disabled(run.backend):
            anchors = self._policy_features(prompts, seeds, run.settings.num_steps)
        if per_group:
            anchors = anchors.repeat_interleave(g, dim=0)
        bonus = perceptual_anchor(inputs.features.cpu(), anchors)
        self._log["anchor_distance"] = float(-bonus.mean())
        return bonus.to(inputs.task_rewards.device)

    @torch.no_grad()
    def _base_prompt_vendi(self) -> torch.Tensor:
        """The LoRA-off policy's Vendi ``[number of training prompts]`` of ``pec.population`` ODE samples of every
        training prompt (seeds drawn once from the generator of (seed, −2)): the automatic β's reference for a
        population bonus, measured once per run and kept in checkpoints."""
        run, k = self._run, self.population
        seeds = torch.randint(2**31, (k,), generator=iteration_rng(run.seed, -2)).tolist()
        with lora_disabled(run.backend):
            features = self._policy_features(
                [p for p in run.prompts for _ in range(k)], seeds * len(run.prompts), run.settings.num_steps
            )
        return vendi_score(features.reshape(len(run.prompts), k, -1))

    def _steer_beta(self, population: torch.Tensor, prompt_ids: list[int]) -> None:
        """One :func:`~comfy_pec.perceptual.adaptive_beta` step on this iteration's population ``[P, K, d_f]`` of the
        training prompts ``prompt_ids`` ``[P]``: the mean of their Vendi over the base's, held at ``pec.beta_target``."""
        ratio = float((vendi_score(population) / self.prompt_reference[prompt_ids]).mean())
        a = self.auto
        self.beta = adaptive_beta(self.beta, ratio, 1.0, a.target, a.lr, a.lo, a.hi)
        self._log["population_vendi_ratio"] = ratio

    def shape(self, rewards: torch.Tensor, inputs: ShapeInputs) -> torch.Tensor:
        g = inputs.group_size
        if self.bonus in POPULATION_BONUSES:
            bonus = self._population_bonus(inputs)
        elif self.bonus == "anchor":
            bonus = self._anchor_bonus(inputs)
        else:
            bonus = pec_bonus(inputs.stats.energy, g, self.step_norm, clip=self.bonus_clip)
        if self.control == "shuffled":
            bonus = shuffle_within_groups(bonus, g, iteration_rng(self._run.seed, -3 - self._iteration))
        # Per group: the task reward's spread and the β·bonus spread (where the second is larger, the bonus
        # decides the group's advantages), and the mean energy per trained step.
        self._log.update(
            beta=self.beta,
            group_reward_std=inputs.task_rewards.reshape(-1, g).std(1, unbiased=False).tolist(),
            group_bonus_std=(self.beta * bonus).reshape(-1, g).std(1, unbiased=False).tolist(),
        )
        if inputs.stats is not None:
            self._log["step_energy"] = inputs.stats.energy.mean(0).tolist()
        if self.combine == "decoupled":
            return decoupled_reward(rewards, bonus, self.beta, g)
        if self.combine == "relative":
            return relative_reward(rewards, bonus, self.beta, g)
        return rewards + self.beta * bonus

    def log(self) -> dict[str, Any]:
        return self._log

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "reference": self.reference, "prompt_reference": self.prompt_reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state.get("beta", self.beta)
        self.reference = state.get("reference")
        self.prompt_reference = state.get("prompt_reference")


def shuffle_within_groups(values: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """``values`` ``[N]`` (group-contiguous) with each group's entries in a random order (``generator``'s)."""
    order = torch.rand(values.shape[0] // group_size, group_size, generator=generator).argsort(dim=1)
    return values.reshape(-1, group_size).gather(1, order.to(values.device)).reshape(-1)


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
