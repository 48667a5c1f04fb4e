"""One iteration's sampling and what GRPO stores of it (docs/design.md §9).

:func:`rollout` samples P prompts × G samples with the current policy, walking each iteration's
:class:`Schedule` (SDE on its stochastic steps, ODE elsewhere) and keeping, per trained step, the state
``x``, the sampled ``x'``, the old-policy mean ``μ_old`` and ``log p_old``; :func:`perceive` measures
the perceptual quantities of those steps (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends import Backend, PromptEmbeds
from .perceptual import PerceptualStats, measure_steps
from .sampling import NoiseLevel, StepRecord, denoise, seeded_noise


@dataclass(frozen=True)
class RolloutSettings:
    """How a run samples, fixed for the run (the model's defaults filled in)."""

    sde: str  # step kind of the trained steps (comfy_pec.sde.STEP_KINDS)
    guidance: float
    resolution: int
    batch_size: int  # samples per micro-batch
    log_prob_reduction: str
    sigmas: torch.Tensor  # the run's schedule [S + 1]
    noise_level: float

    @property
    def num_steps(self) -> int:
        """``S``, the sampling steps of the run's schedule."""
        return len(self.sigmas) - 1


@dataclass
class Schedule:
    """One iteration's schedule: ``sigmas`` ``[S + 1]``, which steps are stochastic ``[S]`` (bool), the noise
    level (one, or one per step ``[S]``), and whether a group shares its initial noise."""

    sigmas: torch.Tensor
    stochastic: torch.Tensor
    noise_level: NoiseLevel
    shared_init: bool = False


@dataclass
class Rollout:
    """Everything one iteration sampled; N = P·G samples (group-contiguous), T trained steps."""

    prompts: list[str]  # [N]
    cond: PromptEmbeds  # [N, ...]
    latents: torch.Tensor  # x before each trained step [N, T, ...]
    next_latents: torch.Tensor  # x' [N, T, ...]
    means: torch.Tensor  # μ_old [N, T, ...]
    next_x0: torch.Tensor  # x̂0(x') [N, T, ...]
    log_probs: torch.Tensor  # log p_old [N, T]
    stds: torch.Tensor  # std_step [T]
    steps: list[int]  # indices of the trained steps [T]
    images: torch.Tensor  # final images [N, 3, H, W] in [0, 1], CPU


def iteration_rng(seed: int, iteration: int) -> torch.Generator:
    """The generator of every random draw of ``iteration`` of a run with ``train.seed`` = ``seed``: a resumed
    run replays exactly what an uninterrupted one would have drawn."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def group_initial_seeds(seeds: torch.Tensor, group_size: int, shared: bool) -> torch.Tensor | None:
    """Seeds of the initial noise ``[N]`` when a group shares it (each group's first seed, repeated), else
    ``None`` (every sample starts from its own seed). E-GRPO shares it so a group shares its ODE prefix up
    to the merged jump; ``sampling.shared_init_noise`` (DanceGRPO) so the in-group reward spread comes
    from the trained SDE steps."""
    if not shared:
        return None
    return seeds.reshape(-1, group_size)[:, :1].expand(-1, group_size).reshape(-1)


def _stack(records: list[list[StepRecord]], field: str) -> torch.Tensor:
    """Per-batch lists of T records → ``[N, T, ...]``."""
    return torch.cat([torch.stack([getattr(r, field) for r in batch], dim=1) for batch in records])


@torch.no_grad()
def rollout(
    backend: Backend,
    prompts: list[str],
    seeds: torch.Tensor,
    schedule: Schedule,
    settings: RolloutSettings,
    init_seeds: torch.Tensor | None = None,
    prompt_noise: Callable[[PromptEmbeds, slice], PromptEmbeds] | None = None,
) -> Rollout:
    """Sample ``prompts`` (one entry per sample) in micro-batches, recording the trained steps.

    ``seeds`` ``[N]`` seed each sample's noise; ``init_seeds`` ``[N]``, when given, seed the initial
    noise instead (a group sharing its start). ``prompt_noise(cond, samples)`` perturbs the embeddings of the
    samples in a slice (DRIFT); the stored embeddings are the perturbed ones, so the update sees them too.
    """
    batch = settings.batch_size
    shape = backend.latent_shape(settings.resolution, settings.resolution)
    records, conds, images = [], [], []
    backend.cache_prompts(prompts)  # one text-encoder pass (and move, when offloaded) per iteration
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch]]
        init_gens = (
            gens
            if init_seeds is None
            else [torch.Generator().manual_seed(int(s)) for s in init_seeds[start : start + batch]]
        )
        cond = backend.encode_prompts(part)
        if prompt_noise is not None:
            cond = prompt_noise(cond, slice(start, start + batch))
        final, recs = denoise(
            backend,
            seeded_noise((len(part), *shape), init_gens, backend.device),
            cond,
            schedule.sigmas,
            guidance_scale=settings.guidance,
            sde=settings.sde,
            noise_level=schedule.noise_level,
            stochastic=schedule.stochastic,
            generators=gens,
            log_prob_reduction=settings.log_prob_reduction,
            record=True,
        )
        records.append(recs)
        conds.append(cond)
        images.append(backend.decode(final).cpu())
    first = records[0]
    return Rollout(
        prompts=list(prompts),
        cond=PromptEmbeds.cat(conds),
        latents=_stack(records, "latents"),
        next_latents=_stack(records, "next_latents"),
        means=_stack(records, "mean"),
        next_x0=_stack(records, "next_x0"),
        log_probs=_stack(records, "log_prob"),
        stds=torch.stack([r.std.reshape(()) for r in first]).cpu(),
        steps=[r.index for r in first],
        images=torch.cat(images),
    )


def group_draw_latents(means: torch.Tensor, stds: torch.Tensor, draw_seeds: torch.Tensor) -> torch.Tensor:
    """``x̃'_{i,t} = μ_{i,t} + std_t·ε_{g,t}``: every trained step's mean perturbed by a draw that sample i
    shares with the samples of the same seed (its group's), common random numbers for the residual energy.

    ``means`` ``[N, T, ...]``, ``stds`` ``[T]``, ``draw_seeds`` ``[N]`` → ``[N, T, ...]``, like ``means``.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in draw_seeds]
    eps = seeded_noise(means.shape, gens, means.device).to(means.dtype)
    std = stds.to(means.device, means.dtype).reshape(1, -1, *([1] * (means.dim() - 2)))
    return means + std * eps


@torch.no_grad()
def perceive(
    backend: Backend,
    encoder,
    ro: Rollout,
    sigmas: torch.Tensor,
    guidance: float,
    decode: str = "noisy",
    chunk_size: int = 32,
    batch_size: int = 8,
    draw_seeds: torch.Tensor | None = None,
) -> PerceptualStats:
    """docs/design.md §5 on the rollout buffer: decode and embed ``x'`` and ``μ_old`` of every trained step.

    ``decode="x0"`` embeds the clean predictions instead: ``x̂0(x')`` came free with the rollout,
    ``x̂0(μ_old)`` costs one forward per step at σ' (``batch_size`` samples at a time).
    ``draw_seeds`` ``[N]`` (``pec.energy_draw: group``; equal within a group) replace each ``x'`` by
    :func:`group_draw_latents`; the latent energy then measures that draw too.
    """
    if draw_seeds is not None:
        ro = dataclasses.replace(ro, next_latents=group_draw_latents(ro.means, ro.stds, draw_seeds))
    targets = None
    if decode == "x0":
        mean_x0 = torch.empty_like(ro.means)
        for j, i in enumerate(ro.steps):
            sigma_next = float(sigmas[i + 1])
            for s in range(0, len(ro.prompts), batch_size):
                sl = slice(s, s + batch_size)
                mu = ro.means[sl, j]
                v = backend.velocity(mu, sigma_next, ro.cond.select(sl), guidance)
                mean_x0[sl, j] = mu - sigma_next * v
        targets = (ro.next_x0, mean_x0)
    return measure_steps(backend.decode, encoder, ro.next_latents, ro.means, ro.stds, chunk_size, targets=targets)
