"""Flow-matching schedules and stochastic sampling steps with their log-probabilities (docs/design.md §2-§3).

Conventions (docs/design.md §2): ``x_σ = (1-σ)·x0 + σ·ε`` with σ ∈ [0, 1] (σ = 1 is pure noise), the model
predicts the velocity ``v ≈ ε - x0``, and the clean estimate is ``x̂0 = x - σ·v``. A schedule is a
decreasing 1-D tensor of N+1 sigmas ending in 0; step i goes from ``sigmas[i]`` to ``sigmas[i+1]``.

Every step function computes in float32 whatever the dtype of its inputs (bf16 networks feed it), and
returns a :class:`StepResult` in float32; callers cast ``x_next`` back to their working dtype.

Shapes: ``x``, ``v`` and ``noise`` are ``[B, ...]`` (latents, e.g. ``[B, C, H, W]`` or packed FLUX
tokens ``[B, L, C]``). ``sigma``/``sigma_next`` are Python floats, 0-d tensors, or ``[B]`` tensors
(one sigma per sample, broadcast over the non-batch dims).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import PECError
from .kinds import SDE_KINDS, STEP_KIND_NAMES, WINDOW_RULES

Sigma = float | torch.Tensor

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

__all__ = [
    "StepResult",
    "base_sigmas",
    "shift_sigmas",
    "sd3_schedule",
    "flux_mu",
    "flux_shift_sigmas",
    "flux_schedule",
    "flow_sde_step",
    "cps_step",
    "ode_step",
    "STEP_KINDS",
    "SDE_KINDS",
    "step_kind",
    "gaussian_log_prob",
    "step_entropy",
    "gaussian_kl",
    "window_all",
    "window_fixed",
    "window_sliding",
    "sample_window_start",
    "stochastic_steps",
    "WINDOW_RULES",
    "MergedStep",
    "flow_sde_stds",
    "egrpo_merge_steps",
    "egrpo_schedule",
]


# --------------------------------------------------------------------------------------------------
# Schedules (docs/design.md §2)
# --------------------------------------------------------------------------------------------------


def base_sigmas(num_steps: int) -> torch.Tensor:
    """Unshifted sigmas ``linspace(1, 1/N, N)`` (what diffusers' FLUX pipeline passes), float32 [N].

    The terminal 0 is appended by the schedule functions after shifting.
    """
    if num_steps < 1:
        raise PECError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1].float()


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 static shift: ``σ' = s·σ / (1 + (s-1)·σ)``. Any shape; float32 out."""
    sigmas = sigmas.float()
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sd3_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3/SD3.5 schedule: static shift (s=3 by default) of :func:`base_sigmas`, then 0. [N+1]."""
    return _append_zero(shift_sigmas(base_sigmas(num_steps), shift))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX dynamic-shift exponent, linear in the packed latent token count L:
    ``μ = 0.5 + 0.65·(L - 256)/3840`` with the defaults (1024² → L = 4096 → μ = 1.15)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX dynamic shift: ``σ' = e^μ / (e^μ + 1/σ - 1)``. Any shape; float32 out.

    Evaluated as ``e^μ·σ / (e^μ·σ + 1 - σ)`` in float64 so σ = 1 maps to exactly 1 (the Flow-SDE
    step special-cases σ = 1) and σ = 0 to 0.
    """
    s = sigmas.double()
    e_mu = math.exp(mu)
    return (e_mu * s / (e_mu * s + 1.0 - s)).float()


def flux_schedule(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX.1 schedule for ``image_seq_len`` packed tokens ((H/16)·(W/16) for an H×W image). [N+1]."""
    return _append_zero(flux_shift_sigmas(base_sigmas(num_steps), flux_mu(image_seq_len)))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch a decreasing schedule so its last sigma is ``terminal`` (Qwen-Image ends at 0.02):
    ``σ' = 1 - (1 - σ)·(1 - terminal)/(1 - σ_N)``. float32 out."""
    one_minus = 1.0 - sigmas.double()
    return (1.0 - one_minus * ((1.0 - terminal) / one_minus[-1])).float()


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical dynamic-shift exponent, linear in the step count N between two fits linear in
    the token count L: ``μ_200 = 1.6927e-4·L + 0.45667`` (200 steps) and ``μ_10 = 8.7381e-5·L + 1.89833``
    (10 steps); ``μ = μ_10 + (μ_200 - μ_10)·(N - 10)/190``, and ``μ = μ_200`` for L > 4300."""
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return float(mu_10 + (mu_200 - mu_10) * (num_steps - 10) / 190.0)


def scheduler_schedule(num_steps: int, image_seq_len: int, config: dict, mu: float | None = None) -> torch.Tensor:
    """The schedule a diffusers ``FlowMatchEulerDiscreteScheduler`` ``config`` gives for
    ``linspace(1, 1/N, N)`` (what the FLUX.2, Z-Image and Qwen-Image pipelines pass), then 0. [N+1].

    Dynamic shifting: ``mu`` when given (FLUX.2: :func:`flux2_mu`), else :func:`flux_mu` with the config's
    ``base/max_image_seq_len`` and ``base/max_shift``, applied as :func:`flux_shift_sigmas` (``time_shift_type`` exponential, the only
    one these families use); else the static shift ``config["shift"]``. A ``shift_terminal`` then
    stretches the schedule with :func:`stretch_to_terminal`.
    """
    if config.get("time_shift_type", "exponential") != "exponential":
        raise PECError(f"time_shift_type {config['time_shift_type']!r} is not supported (only exponential)")
    sigmas = base_sigmas(num_steps)
    if config.get("use_dynamic_shifting"):
        mu = (
            mu
            if mu is not None
            else flux_mu(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )
        sigmas = flux_shift_sigmas(sigmas, mu)
    else:
        sigmas = shift_sigmas(sigmas, float(config.get("shift", 1.0)))
    if config.get("shift_terminal"):
        sigmas = stretch_to_terminal(sigmas, float(config["shift_terminal"]))
    return _append_zero(sigmas)


# --------------------------------------------------------------------------------------------------
# Steps (docs/design.md §3)
# --------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One sampling step, all float32.

    Attributes:
        x_next: sampled next latent ``x'``, ``[B, ...]``.
        mean: the Gaussian mean ``μ`` of ``p(x' | x)``, ``[B, ...]``.
        std: ``std_step``, the Gaussian std of the step; broadcastable to ``x`` (0-d or ``[B, 1, ...]``).
            Zero for a deterministic step.
        scale: ``std_step / sqrt(Δ)`` — the SDE's diffusion coefficient ``s`` for Flow-SDE. Flow-GRPO's
            KL divides by ``s²`` instead of ``std_step²``; the trainer keeps that as a compatibility switch.
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor


def _as_sigma(sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """A sigma as float32 on x's device, shaped to broadcast against ``x`` ([B] → [B, 1, ...])."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 1:
        s = s.reshape(-1, *([1] * (x.dim() - 1)))
    elif s.dim() > 1:
        raise PECError(f"sigma must be a float, a 0-d tensor or a [B] tensor, got shape {tuple(s.shape)}")
    return s


def _prepare(x, v, sigma, sigma_next):
    x32, v32 = x.float(), v.float()
    s, s_next = _as_sigma(sigma, x32), _as_sigma(sigma_next, x32)
    return x32, v32, s, s_next, s - s_next


def _draw(noise: torch.Tensor | None, like: torch.Tensor, generator) -> torch.Tensor:
    if noise is not None:
        return noise.to(device=like.device, dtype=torch.float32)
    # Drawn on the generator's device (CPU by default) so a seed gives the same noise on any device.
    gen_device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=gen_device, dtype=torch.float32).to(like.device)


def ode_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float = 0.0,
    noise: torch.Tensor | None = None,
    sigma_1: Sigma | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Deterministic Euler step of the probability-flow ODE: ``x' = x - Δ·v`` with ``Δ = σ - σ'``.

    The noise arguments are accepted and ignored, so every entry of :data:`STEP_KINDS` takes the same ones.
    """
    del noise_level, noise, sigma_1, generator
    x32, v32, _, _, delta = _prepare(x, v, sigma, sigma_next)
    mean = x32 - delta * v32
    zero = torch.zeros_like(delta)
    return StepResult(x_next=mean, mean=mean, std=zero, scale=zero)


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    noise: torch.Tensor | None = None,
    sigma_1: Sigma | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Flow-SDE step of Flow-GRPO (Euler-Maruyama of the marginal-preserving reverse SDE).

    With ``Δ = σ - σ'`` and noise level ``a``::

        s     = a · sqrt(σ / (1 - σ̃)),   σ̃ = σ_1 if σ == 1 else σ
        μ     = x - Δ · [v + s²/(2σ) · (x + (1-σ)·v)]
        x'    = μ + s·sqrt(Δ)·ε,           std_step = s·sqrt(Δ)

    ``σ_1`` replaces σ = 1 in the denominator (which would be 0); like Flow-GRPO it defaults to the
    schedule's second sigma, i.e. ``sigma_next`` of the first step. ``a = 0`` gives the Euler ODE step.
    ``noise`` (``[B, ...]``, standard normal) is drawn from ``generator`` when not given.
    """
    x32, v32, s_cur, s_next, delta = _prepare(x, v, sigma, sigma_next)
    s1 = s_next if sigma_1 is None else _as_sigma(sigma_1, x32)
    sigma_tilde = torch.where(s_cur >= 1.0, s1, s_cur)
    if bool((sigma_tilde >= 1.0).any()):
        raise PECError("flow_sde_step: sigma_1 must be < 1 to step from sigma = 1")
    scale = noise_level * torch.sqrt(s_cur / (1.0 - sigma_tilde))
    mean = x32 - delta * (v32 + scale**2 / (2.0 * s_cur) * (x32 + (1.0 - s_cur) * v32))
    std = scale * torch.sqrt(delta)
    x_next = mean + std * _draw(noise, x32, generator) if noise_level != 0 else mean
    return StepResult(x_next=x_next, mean=mean, std=std, scale=scale)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    noise: torch.Tensor | None = None,
    sigma_1: Sigma | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Coefficient-preserving sampling (CPS) step: re-noise the clean estimate to exactly σ'.

    ::

        σ_c = σ' · sin(a·π/2),   x̂0 = x - σ·v,   x̂1 = x + (1-σ)·v
        μ   = (1-σ')·x̂0 + sqrt(σ'² - σ_c²)·x̂1
        x'  = μ + σ_c·ε,          std_step = σ_c

    ``sigma_1`` is accepted for a signature identical to :func:`flow_sde_step` and unused.
    ``a = 0`` gives the Euler ODE step; the step into σ' = 0 is deterministic.
    """
    del sigma_1
    x32, v32, s_cur, s_next, delta = _prepare(x, v, sigma, sigma_next)
    std = s_next * math.sin(noise_level * math.pi / 2.0)
    x0_hat = x32 - s_cur * v32
    x1_hat = x32 + (1.0 - s_cur) * v32
    mean = (1.0 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0.0)) * x1_hat
    x_next = mean + std * _draw(noise, x32, generator) if noise_level != 0 else mean
    return StepResult(x_next=x_next, mean=mean, std=std, scale=std / torch.sqrt(delta))


#: The step kinds by name (:mod:`comfy_pec.kinds`), one registry for the trainer, `pec sample` and the ComfyUI
#: sampler node. Every entry takes ``(x, v, sigma, sigma_next, noise_level, noise=None, sigma_1=None,
#: generator=None)``.
STEP_KINDS: dict[str, Callable[..., StepResult]] = dict(zip(STEP_KIND_NAMES, (ode_step, flow_sde_step, cps_step)))


def step_kind(name: str) -> Callable[..., StepResult]:
    """The step function called ``name`` in :data:`STEP_KINDS`; an unknown name is a :class:`PECError`."""
    if name not in STEP_KINDS:
        raise PECError(f"unknown step kind {name!r}; expected one of {', '.join(STEP_KINDS)}")
    return STEP_KINDS[name]


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``log N(x; mean, std²)`` per element, reduced over the non-batch dims → ``[B]`` float32.

    ``log p = -(x-μ)²/(2·std²) - log std - ½·log 2π``. ``reduction="mean"`` (Flow-GRPO's default;
    it sets the scale of the PPO clip range) or ``"sum"`` (the true joint log-density).
    ``std`` must be > 0 and broadcastable to ``x``.
    """
    x32, mean32 = x.float(), mean.float()
    std32 = torch.as_tensor(std, dtype=torch.float32, device=x32.device)
    elem = -((x32 - mean32) ** 2) / (2.0 * std32**2) - torch.log(std32) - LOG_SQRT_2PI
    return _reduce(elem, reduction)


def _reduce(elem: torch.Tensor, reduction: str) -> torch.Tensor:
    dims = tuple(range(1, elem.dim()))
    if reduction == "mean":
        return elem.mean(dim=dims) if dims else elem
    if reduction == "sum":
        return elem.sum(dim=dims) if dims else elem
    raise PECError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def step_entropy(std: float | torch.Tensor, dim: int) -> torch.Tensor:
    """Closed-form entropy of a step's Gaussian policy: ``H = (d/2)·log(2πe·std_step²)`` (float32).

    It depends on the schedule and noise level only, never on the network (paper Property 1): use
    ``dim = 1`` for the per-element value matching ``reduction="mean"`` log-probs.
    """
    std32 = torch.as_tensor(std, dtype=torch.float32)
    return 0.5 * dim * torch.log(2.0 * math.pi * math.e * std32**2)


def gaussian_kl(
    mean: torch.Tensor, mean_ref: torch.Tensor, std: float | torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """KL between two step Gaussians of equal std: ``||μ_θ - μ_ref||² / (2·std²)`` per element → [B].

    Pass ``StepResult.std`` for the exact KL (default in the trainer); passing ``StepResult.scale``
    reproduces Flow-GRPO's normalisation (a factor Δ off).
    """
    std32 = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    elem = (mean.float() - mean_ref.float()) ** 2 / (2.0 * std32**2)
    return _reduce(elem, reduction)


# --------------------------------------------------------------------------------------------------
# Which steps are stochastic (docs/design.md §3 "Windows"). Each returns a bool mask [num_steps]; True = SDE
# step (sampled with noise and trained), False = ODE step. The last step (into σ = 0) is never
# stochastic: it produces the final image and is never trained (docs/design.md §4).
# --------------------------------------------------------------------------------------------------


def window_all(num_steps: int) -> torch.Tensor:
    """Every step but the last is an SDE step (Flow-GRPO)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    mask[-1] = False
    return mask


def window_fixed(num_steps: int, size: int, start: int) -> torch.Tensor:
    """``size`` consecutive SDE steps from ``start``, ODE elsewhere (Flow-GRPO-Fast)."""
    if size < 1 or start < 0 or start + size > num_steps - 1:
        raise PECError(
            f"SDE window [{start}, {start + size}) must be non-empty and lie within the first "
            f"{num_steps - 1} of {num_steps} steps (the last step is always ODE)"
        )
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start : start + size] = True
    return mask


def sample_window_start(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """Uniform window start in ``[low, high]`` (inclusive), drawn per iteration by Flow-GRPO-Fast."""
    if high < low:
        raise PECError(f"window start range is empty: [{low}, {high}]")
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def window_sliding(num_steps: int, size: int, iteration: int, shift_every: int, stride: int = 1) -> torch.Tensor:
    """MixGRPO's sliding window: starts at the noisiest step and moves ``stride`` steps towards low
    noise every ``shift_every`` iterations, stopping at the last admissible position."""
    if shift_every < 1:
        raise PECError(f"shift_every must be >= 1, got {shift_every}")
    last_start = num_steps - 1 - size
    start = min((iteration // shift_every) * stride, last_start)
    return window_fixed(num_steps, size, start)


def stochastic_steps(
    rule: str,
    sigmas: torch.Tensor | int,
    *,
    start: int = 0,
    size: int = 1,
    sigma_low: float = 0.0,
    sigma_high: float = 1.0,
    iteration: int = 0,
    shift_every: int = 25,
    stride: int = 1,
) -> torch.Tensor:
    """Which steps of a schedule are stochastic → bool ``[N]``, by one of :data:`comfy_pec.kinds.WINDOW_RULES`.

    ``sigmas`` is the schedule ``[N+1]`` (or just N where the rule needs no sigmas). ``all``: every step;
    ``steps``: ``size`` steps from step ``start`` (0-based; steps past the end are dropped; the trainer's
    Flow-GRPO-Fast window draws ``start`` per iteration); ``sigmas``: the steps that start at a σ in
    ``[sigma_low, sigma_high]``; ``sliding``: MixGRPO's window (:func:`window_sliding`). The last step
    (into the final σ) is always ODE: it gives the image and is never trained (docs/design.md §3).
    """
    num_steps = sigmas if isinstance(sigmas, int) else len(sigmas) - 1
    if num_steps < 1:
        raise PECError(f"a schedule needs at least one step, got {num_steps}")
    if rule == "all":
        return window_all(num_steps)
    if rule == "sliding":
        return window_sliding(num_steps, size, iteration, shift_every, stride)
    if rule == "steps":
        if start < 0 or size < 0:
            raise PECError(f"SDE window start and size must be >= 0, got start={start} size={size}")
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[start : start + size] = True
    elif rule == "sigmas":
        if isinstance(sigmas, int):
            raise PECError("the 'sigmas' window rule needs the schedule's sigmas, not only its step count")
        if sigma_low > sigma_high:
            raise PECError(f"SDE window sigma_low {sigma_low} is above sigma_high {sigma_high}")
        start_sigmas = sigmas[:-1].float().cpu()
        mask = (start_sigmas >= sigma_low) & (start_sigmas <= sigma_high)
    else:
        raise PECError(f"unknown SDE window {rule!r} (unknown window rule; expected one of {', '.join(WINDOW_RULES)})")
    mask[-1] = False
    return mask


# --------------------------------------------------------------------------------------------------
# E-GRPO (docs/design.md §6): entropy-adaptive merging of low-entropy steps into one SDE jump
# --------------------------------------------------------------------------------------------------


@dataclass
class MergedStep:
    """One E-GRPO jump: steps ``start … start+length-1`` replaced by one SDE step σ_start → σ_{start+length}.

    Attributes:
        start: index of the first replaced step in the unmerged schedule.
        length: number of replaced steps ``m`` (1 = a high-entropy step kept as it is).
        std: ``sqrt(Σ std_k²)`` over the replaced steps — the jump injects their total noise variance.
    """

    start: int
    length: int
    std: float


def flow_sde_stds(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """``std_step`` of every Flow-SDE step of a schedule (``sigmas`` [N+1]) → float32 ``[N]``.

    The step's std does not depend on x or v, so it is read off :func:`flow_sde_step` on a zero latent
    (σ = 1 uses ``σ_1 = sigmas[1]`` as the sampler does).
    """
    zero = torch.zeros(1)
    sigma_1 = float(sigmas[1])
    return torch.stack(
        [
            flow_sde_step(
                zero, zero, float(sigmas[i]), float(sigmas[i + 1]), noise_level, noise=zero, sigma_1=sigma_1
            ).std
            for i in range(len(sigmas) - 1)
        ]
    ).reshape(-1)


def egrpo_merge_steps(stds: torch.Tensor, tau: float) -> list[MergedStep]:
    """E-GRPO's merge rule on the per-step stds ``[N]`` of a schedule (the last step is never trained).

    Per-dimension step entropy ``h = ½·log(2πe·std²)`` (:func:`step_entropy` with ``dim = 1``).
    Walking from the noisiest step, steps ``k … k+m-1`` become one jump with ``m`` the smallest
    length whose merged std ``sqrt(Σ std²)`` reaches ``h ≥ τ`` — so a step that reaches τ on its own
    stays single, and low-entropy steps are merged just enough. A trailing run that cannot reach τ
    before the last trainable step stays ODE (late low-entropy steps carry little reward signal).
    Returns the jumps in schedule order (possibly empty when τ is out of reach).

    τ is in nats per latent dimension. The trainer's default τ = 0.5 (``sampling.window.tau``) was
    calibrated on the embedded model's schedule (10 steps, shift 1, a = 0.7; h = 1.06, 1.01, 0.60,
    0.33, 0.11, -0.09 … -1.19): jumps (0), (1), (2), (3, 4) — the noisy half of the trajectory is
    trained, as E-GRPO recommends. E-GRPO's published τ ≈ 2.2 uses other units.
    """
    jumps: list[MergedStep] = []
    trainable = len(stds) - 1
    k = 0
    while k < trainable:
        variance = 0.0
        for m in range(1, trainable - k + 1):
            variance += float(stds[k + m - 1]) ** 2
            if float(step_entropy(math.sqrt(variance), 1)) >= tau:
                jumps.append(MergedStep(k, m, math.sqrt(variance)))
                break
        else:
            return jumps
        k += m
    return jumps


def egrpo_schedule(
    sigmas: torch.Tensor, jump: MergedStep, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schedule of an E-GRPO rollout that trains ``jump``: ODE everywhere but the merged SDE jump.

    Returns ``(sigmas [N+2-m], stochastic bool [N+1-m], noise levels [N+1-m])``: the jump's interior
    sigmas are removed, and its Flow-SDE noise level ``a' = jump.std / std(a = 1)`` (std_step is linear
    in ``a``) makes its std ``sqrt(Σ std_k²)``; the other entries keep ``noise_level`` (unused: ODE).
    """
    merged = torch.cat([sigmas[: jump.start + 1], sigmas[jump.start + jump.length :]])
    stochastic = torch.zeros(len(merged) - 1, dtype=torch.bool)
    stochastic[jump.start] = True
    unit_std = float(flow_sde_stds(merged, 1.0)[jump.start])
    levels = torch.full((len(merged) - 1,), float(noise_level))
    levels[jump.start] = jump.std / unit_std
    return merged, stochastic, levels
