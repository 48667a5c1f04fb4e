"""Sampling loop shared by `pec sample`, evaluation and GRPO rollouts.

One loop, :func:`denoise`, walks a sigma schedule with the steps of ``comfy_pec.sde``: an SDE step
(Flow-SDE or CPS) where the window mask says so, the Euler ODE step elsewhere. With ``record=True``
it keeps, for every stochastic step, what GRPO needs later: the latent before the step, the sampled
next latent, the step mean μ_old, its std and log p_old.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from comfy_pec import PECError
from comfy_pec.sde import gaussian_log_prob, ode_step, step_kind, stochastic_steps

from .backends.base import Backend, PromptEmbeds

Generators = torch.Generator | Sequence[torch.Generator] | None
NoiseLevel = float | torch.Tensor


@dataclass
class StepRecord:
    """One stochastic step of a rollout; tensors are float32 on the sampling device.

    Attributes:
        index: step index i (from ``sigmas[i]`` to ``sigmas[i+1]``).
        latents: ``x`` before the step ``[B, ...]``.
        next_latents: the sampled ``x'`` ``[B, ...]``.
        mean: the step mean ``μ_old`` ``[B, ...]``.
        std: ``std_step`` (0-d, or broadcastable ``[B, 1, ...]``).
        log_prob: ``log p_old(x' | x)`` ``[B]`` (reduction "mean", docs/design.md §3).
        next_x0: the clean prediction ``x̂0(x') = x' - σ'·v(x', σ')``, free from the next step's
            velocity (``None`` until that step ran).
    """

    index: int
    latents: torch.Tensor
    next_latents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    next_x0: torch.Tensor | None = None


def step_noise_level(noise_level: NoiseLevel, index: int) -> float:
    """The noise level of step ``index``: ``noise_level`` itself, or its entry when given per step ``[N]``."""
    return float(noise_level[index]) if isinstance(noise_level, torch.Tensor) else noise_level


def seeded_noise(shape: Sequence[int], generators: Generators, device=None) -> torch.Tensor:
    """Standard normal noise ``[B, *shape[1:]]`` drawn on the CPU.

    With one generator per sample, sample i's noise depends on its own generator only, so an image is
    the same whatever batch it is drawn in and on any device.
    """
    if isinstance(generators, Sequence):
        if len(generators) != shape[0]:
            raise PECError(f"{len(generators)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators])
    else:
        noise = torch.randn(tuple(shape), generator=generators)
    return noise.to(device) if device is not None else noise


def denoise(
    backend: Backend,
    latents: torch.Tensor,
    cond: PromptEmbeds,
    sigmas: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    uncond: PromptEmbeds | None = None,
    sde: str = "flow_sde",
    noise_level: NoiseLevel = 0.0,
    stochastic: torch.Tensor | None = None,
    generators: Generators = None,
    log_prob_reduction: str = "mean",
    record: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, list[StepRecord]]:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` starting at ``latents`` (``[B, ...]``).

    Args:
        sigmas: ``[N + 1]`` decreasing, ending in 0.
        sde: the step kind (``comfy_pec.sde.STEP_KINDS``) of the steps where ``stochastic`` is True;
            ``"ode"`` samples every step with the Euler ODE.
        noise_level: the SDE noise level ``a``, or one per step ``[N]`` (E-GRPO's merged jump has its own).
        stochastic: bool ``[N]`` (see ``comfy_pec.sde.stochastic_steps``); default: all ODE.
        generators: CPU generator(s) for the step noise (one per sample for batch-independent images).
        record: keep a :class:`StepRecord` of every stochastic step.
    Returns:
        ``(final latents [B, ...] float32, records)``.
    """
    num_steps = len(sigmas) - 1
    stochastic = torch.zeros(num_steps, dtype=torch.bool) if stochastic is None else stochastic
    if len(stochastic) != num_steps:
        raise PECError(f"window mask has {len(stochastic)} entries for {num_steps} steps")
    step_fn = step_kind(sde)
    x = latents.float()
    records: list[StepRecord] = []
    sigma_1 = float(sigmas[1])
    for i in tqdm(range(num_steps), desc="sampling", leave=False, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = backend.velocity(x, sigma, cond, guidance_scale, uncond)
        if records and records[-1].index == i - 1:
            records[-1].next_x0 = x - sigma * v
        level = step_noise_level(noise_level, i)
        if bool(stochastic[i]) and level > 0 and sde != "ode":
            noise = seeded_noise(x.shape, generators, x.device)
            res = step_fn(x, v, sigma, sigma_next, level, noise=noise, sigma_1=sigma_1)
            if record:
                log_prob = gaussian_log_prob(res.x_next, res.mean, res.std, log_prob_reduction)
                records.append(StepRecord(i, x, res.x_next, res.mean, res.std, log_prob))
        else:
            res = ode_step(x, v, sigma, sigma_next)
        x = res.x_next
    return x, records


@torch.no_grad()
def sample_images(
    backend: Backend,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    sde: str = "flow_sde",
    noise_level: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Images ``[len(prompts), 3, H, W]`` in [0, 1]: prompt i drawn with seed i.

    The initial noise and any step noise of image i come from ``torch.Generator().manual_seed(seeds[i])``
    on the CPU, so a (prompt, seed) pair gives the same image in any batch and on any device.
    ``sde="ode"`` or ``noise_level = 0`` samples with the ODE; otherwise every step but the last is ``sde``.
    Unset arguments take the model's defaults (``backend.defaults``).
    """
    if len(prompts) != len(seeds):
        raise PECError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    d = backend.defaults
    num_steps = int(num_steps or d.get("eval_num_steps") or d["num_steps"])
    guidance_scale = float(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    size = int(resolution or d["resolution"])
    sigmas = backend.schedule(num_steps, size, size)
    stochastic = stochastic_steps("all", num_steps)
    shape = backend.latent_shape(size, size)
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="batches", disable=not progress or len(starts) == 1):
        batch_prompts = list(prompts[start : start + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        x = seeded_noise((len(gens), *shape), gens, backend.device)
        cond = backend.encode_prompts(batch_prompts)
        latents, _ = denoise(
            backend,
            x,
            cond,
            sigmas,
            guidance_scale=guidance_scale,
            sde=sde,
            noise_level=noise_level,
            stochastic=stochastic,
            generators=gens,
            progress=progress and len(starts) == 1,
        )
        out.append(backend.decode(latents).cpu())
    return torch.cat(out)
