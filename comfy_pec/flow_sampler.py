"""Sampling loops over a denoiser: the Flow-SDE / CPS sampler and the one-step perceptual probe.

These are what the ComfyUI nodes ``PEC Flow SDE Sampler`` and ``PEC Perceptual Entropy`` run, kept
free of ComfyUI so tests call them directly. A *denoiser* follows ComfyUI's convention:
``denoise(x [B, ...], sigma [B]) -> x̂0 [B, ...]``; the velocity is ``v = (x - x̂0)/σ`` (docs/design.md §2).
Latents are ``[B, C, H, W]`` (or any ``[B, ...]``); ``sigmas`` is a decreasing 1-D tensor of N+1 values.

Per-step noise comes from a CPU ``torch.Generator`` seeded from the sampling seed, so one seed gives the
same noise on any device; the seed is mixed with a constant first so the step noise is not the same
stream as ComfyUI's initial noise (which is ``torch.manual_seed(seed)`` on the CPU too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import PECError
from .sde import SDE_KINDS, StepResult, ode_step, step_kind, stochastic_steps

__all__ = ["StepProbe", "noise_generator", "probe_step", "sample_flow"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates the step noise from the initial noise


def noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of the per-step noise for sampling seed ``seed`` (any int, ComfyUI's are < 2^64)."""
    return torch.Generator(device="cpu").manual_seed((int(seed) + _SEED_MIX) % 2**64)


def _sde_kind(name: str):
    """The stochastic step kind ``name`` (``ode`` is not one: noise level 0 gives the Euler sampler)."""
    if name not in SDE_KINDS:
        raise PECError(f"unknown SDE method {name!r}; expected one of {', '.join(SDE_KINDS)}")
    return step_kind(name)


def _velocity(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, v) at ``x`` and scalar tensor ``sigma`` (> 0), v in float32."""
    denoised = denoise(x, sigma * x.new_ones(x.shape[0]))
    return denoised, (x.float() - denoised.float()) / sigma.float()


def _stochastic_step(step, x, v, sigma, sigma_next, noise_level, generator) -> StepResult:
    # Noise is drawn on the CPU in float32 and moved: the same seed gives the same noise on any device.
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return step(x, v, sigma, sigma_next, noise_level, noise=noise.to(x.device))


def sample_flow(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    method: str = "flow_sde",
    noise_level: float = 0.7,
    sde_mask: torch.Tensor | None = None,
    seed: int = 0,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Flow-SDE / CPS steps (exactly
    :func:`comfy_pec.sde.flow_sde_step` / :func:`comfy_pec.sde.cps_step`) where ``sde_mask`` ([N] bool,
    default :func:`comfy_pec.sde.stochastic_steps` ``all``) is True and Euler ODE steps elsewhere.

    ``x`` is the latent at ``sigmas[0]`` ``[B, ...]``; returns the latent at ``sigmas[-1]`` in ``x``'s
    dtype. ``noise_level`` 0 is ComfyUI's Euler sampler. ``callback(i, x̂0, x)`` is called every step.
    """
    step = _sde_kind(method)
    if noise_level < 0:
        raise PECError(f"noise level must be >= 0, got {noise_level}")
    mask = stochastic_steps("all", sigmas) if sde_mask is None else sde_mask
    generator = noise_generator(seed)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma <= 0:  # already clean (a schedule padded with zeros)
            break
        denoised, v = _velocity(denoise, x, sigma)
        if callback is not None:
            callback(i, denoised, x)
        if mask[i] and noise_level > 0:
            result = _stochastic_step(step, x, v, sigma, sigma_next, noise_level, generator)
        else:
            result = ode_step(x, v, sigma, sigma_next)
        x = result.x_next.to(x.dtype)
    return x


@dataclass
class StepProbe:
    """One stochastic step sampled ``K`` times from the same state (what perceptual entropy measures).

    Attributes:
        step, sigma, sigma_next: the step index and its σ → σ'.
        std: ``std_step`` of the step (a float; the same for every sample).
        mean: the step mean ``μ`` ``[B, ...]``; samples: the K draws ``x'`` ``[K, B, ...]``.
        mean_target / sample_targets: what to decode: ``μ`` and ``x'`` themselves (``decode="noisy"``,
            the paper's default) or their clean predictions ``x̂0`` (``decode="x0"``); same shapes.
    """

    step: int
    sigma: float
    sigma_next: float
    std: float
    mean: torch.Tensor
    samples: torch.Tensor
    mean_target: torch.Tensor
    sample_targets: torch.Tensor


def probe_step(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    step: int,
    repeats: int = 8,
    method: str = "flow_sde",
    noise_level: float = 0.7,
    seed: int = 0,
    decode: str = "noisy",
) -> StepProbe:
    """Run Euler ODE steps from ``sigmas[0]`` up to ``step``, then take that step ``repeats`` times.

    ``x`` ``[B, ...]`` is the latent at ``sigmas[0]``. Costs ``step + 1`` denoiser calls, plus
    ``repeats + 1`` batched calls for ``decode="x0"`` (the clean predictions of every ``x'`` and of ``μ``).
    """
    stepper = _sde_kind(method)
    if not 0 <= step < len(sigmas) - 2:
        raise PECError(f"probe step must be in [0, {len(sigmas) - 3}] (the last step is deterministic), got {step}")
    if repeats < 1 or noise_level <= 0:
        raise PECError(f"need repeats >= 1 and noise level > 0, got repeats={repeats} noise level={noise_level}")
    if decode not in ("noisy", "x0"):
        raise PECError(f"decode must be 'noisy' or 'x0', got {decode!r}")
    for i in range(step):
        _, v = _velocity(denoise, x, sigmas[i])
        x = ode_step(x, v, sigmas[i], sigmas[i + 1]).x_next.to(x.dtype)
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    _, v = _velocity(denoise, x, sigma)
    generator = noise_generator(seed)
    draws = [_stochastic_step(stepper, x, v, sigma, sigma_next, noise_level, generator) for _ in range(repeats)]
    mean = draws[0].mean.to(x.dtype)
    samples = torch.stack([d.x_next for d in draws]).to(x.dtype)
    if decode == "noisy":
        mean_target, sample_targets = mean, samples
    else:
        flat = torch.cat([mean, samples.flatten(0, 1)])
        clean = denoise(flat, sigma_next * flat.new_ones(flat.shape[0]))
        mean_target, sample_targets = clean[: len(mean)], clean[len(mean) :].reshape(samples.shape)
    return StepProbe(
        step=step,
        sigma=float(sigma),
        sigma_next=float(sigma_next),
        std=float(draws[0].std.reshape(-1)[0]),
        mean=mean,
        samples=samples,
        mean_target=mean_target,
        sample_targets=sample_targets,
    )
