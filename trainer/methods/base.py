"""The hooks a training method plugs into the GRPO loop (docs/design.md §6, §9).

A method is a :class:`Method` subclass in a module of its own, registered in :data:`trainer.methods.METHODS`
and built from the config by its :meth:`Method.from_config` (``None`` when its switches are off). The loop
calls the hooks of every active method in registry order; each hook's default changes nothing, so a
method overrides only what it changes:

- ``setup``: once per run, after a resume (E-GRPO's jumps, PCVAE's calibration);
- ``begin_iteration``: before each iteration's draw, with the current policy (PEC's automatic β);
- ``schedule``: this iteration's sampling schedule (the first method that returns one wins);
- ``prompt_noise``: a perturbation of this iteration's prompt embeddings;
- ``shape`` / ``keep``: the reward each sample is judged by, and which samples normalise their group;
- ``adjust_log_prob`` / ``loss``: per trained step of each micro-batch, the log-probabilities that enter
  the clipped surrogate and extra loss terms with their statistics;
- ``log``: this iteration's log entries; ``state_dict`` / ``load_state_dict``: what a checkpoint keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from comfy_pec.sde import StepResult

from ..backends import Backend, PromptEmbeds
from ..perceptual import PerceptualStats
from ..rollout import RolloutSettings, Schedule


@dataclass
class RunContext:
    """What methods may use to set themselves up, once per run."""

    backend: Backend
    encoder: Callable[[torch.Tensor], torch.Tensor]
    prompts: list[str]  # the training prompts
    settings: RolloutSettings
    seed: int  # train.seed
    prompts_per_iteration: int
    group_size: int


@dataclass
class ShapeInputs:
    """What reward shaping sees of one iteration: N samples of all ranks, group-contiguous."""

    task_rewards: torch.Tensor  # the weighted task reward r [N]
    stats: PerceptualStats | None  # energies of the trained steps [N, T] (when a method needs them)
    features: torch.Tensor | None  # perceptual features of the final images [N, d_f]
    steps: list[int]  # indices of the trained steps [T]
    group_size: int
    prompt_ids: list[int]  # each group's prompt, as its index in the training prompts [N / group_size]
    start_seeds: torch.Tensor  # the seed of each sample's initial noise [N]


@dataclass
class StepInputs:
    """One trained step of one micro-batch in the update: B samples, of which ``mask`` ``[B]`` are trained.

    ``result`` is the step under the current policy θ (mean, std); ``x``, ``next_latents`` and
    ``old_mean`` are ``[B, ...]``; ``advantages`` ``[b]`` are the trained samples'; ``entropy`` is the
    rollout's per-sample perceptual entropy h_A of this step ``[B]`` when it was measured.
    """

    backend: Backend
    step_fn: Callable[..., StepResult]
    x: torch.Tensor
    sigma: float
    sigma_next: float
    noise_level: float
    sigma_1: float
    cond: PromptEmbeds
    uncond: PromptEmbeds
    guidance: float
    result: StepResult
    mask: torch.Tensor
    advantages: torch.Tensor
    next_latents: torch.Tensor
    old_mean: torch.Tensor
    entropy: torch.Tensor | None


class Method:
    """A training method: the hooks it overrides (see the module docstring)."""

    name: ClassVar[str]
    #: whether the method needs the rollout's perceptual stats and the final images' features
    uses_perceptual: bool = False
    #: whether it needs the final images' features only (no energies: the trained steps are not decoded)
    uses_features: bool = False

    @classmethod
    def from_config(cls, config) -> Method | None:
        """The method as ``config`` (a :class:`trainer.config.Config`) sets it, or ``None`` when it is off."""
        raise NotImplementedError

    def setup(self, run: RunContext) -> None:
        """Once per run, after any resume (so state loaded from a checkpoint is kept)."""

    def begin_iteration(self, iteration: int) -> None:
        """Before ``iteration``'s draw, with the policy as the previous update left it."""

    def schedule(self, iteration: int, generator: torch.Generator) -> Schedule | None:
        """This iteration's schedule, or ``None`` to leave it to the next method."""
        return None

    def prompt_noise(
        self, iteration: int, generator: torch.Generator, samples: int
    ) -> Callable[[PromptEmbeds, slice], PromptEmbeds] | None:
        """A perturbation of the prompt embeddings of this iteration's ``samples`` samples, or ``None``."""
        return None

    def shape(self, rewards: torch.Tensor, inputs: ShapeInputs) -> torch.Tensor:
        """The reward ``[N]`` after this method's shaping of ``rewards`` ``[N]``."""
        return rewards

    def keep(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor | None:
        """Bool ``[N]``: the samples that normalise their group (``None``: all of them)."""
        return None

    def adjust_log_prob(self, log_prob: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """The trained samples' ``log p_θ`` ``[b]`` as they enter the clipped surrogate."""
        return log_prob

    def loss(self, step: StepInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """An extra loss term of this step (added to the surrogate; ``None`` for none) and its statistics."""
        return None, {}

    def log(self) -> dict[str, Any]:
        """This iteration's log-row entries."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the method."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
