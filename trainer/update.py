"""The policy-gradient update of one iteration (docs/design.md §4): one optimizer step per micro-batch.

For every stored step of every micro-batch it recomputes the step under θ, takes ``log p_θ`` of the stored
``x'``, lets the methods adjust it and add their loss terms, and back-propagates the clipped surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy_pec.sde import gaussian_log_prob, step_kind

from .backends import Backend
from .distributed import SINGLE_PROCESS, LocalAdvantages, Parallel
from .grpo import Advantages, clipped_surrogate
from .methods import Method, StepInputs
from .perceptual import PerceptualStats
from .rollout import Rollout
from .sampling import NoiseLevel, step_noise_level


@dataclass(frozen=True)
class UpdateSettings:
    """The update's knobs (``train.*`` and the rollout's step kind and guidance)."""

    sde: str
    guidance: float
    batch_size: int
    inner_epochs: int = 1
    clip_low: float = 1e-4
    clip_high: float = 1e-4  # Clip-Higher when above clip_low
    grad_clip: float = 1.0
    log_prob_reduction: str = "mean"


def update(
    backend: Backend,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    ro: Rollout,
    adv: Advantages | LocalAdvantages,
    methods: list[Method],
    sigmas: torch.Tensor,
    noise_level: NoiseLevel,
    settings: UpdateSettings,
    perceptual: PerceptualStats | None = None,
    parallel: Parallel = SINGLE_PROCESS,
) -> dict[str, float]:
    """Policy-gradient update on the stored steps; one optimizer step per micro-batch → mean statistics.

    Under several processes ``ro``, ``adv`` (a :class:`LocalAdvantages`) and ``perceptual`` (the rollout's
    stats, for methods that rank by them) are this rank's samples; a micro-batch spans all ranks and the
    loss is weighted so the rank-averaged gradient is the mean over its trained samples, as in one process.
    """
    s = settings
    step_fn = step_kind(s.sde)
    sigma_1 = float(sigmas[1])
    trained = adv.trained
    step_stats: dict[str, list[float]] = {}
    grad_norms: list[float] = []
    for _ in range(s.inner_epochs):
        for start in range(0, len(ro.prompts), s.batch_size):
            sl = slice(start, start + s.batch_size)
            mask = trained[sl].to(backend.device)
            share = parallel.loss_share(int(mask.sum()))
            if share is None:
                continue
            if not share and parallel.sharded is not None:
                # FSDP's forwards and backwards are collectives every rank must join: with no trained sample
                # here, run the whole micro-batch at weight 0 (zero gradient, the other ranks' calls).
                mask = torch.ones_like(mask)
            cond = ro.cond.select(sl)
            uncond = backend.empty_embeds(mask.shape[0])
            a = adv.values[sl].to(backend.device)[mask]
            # no trained sample on this rank (DDP): only join the gradient average
            steps = ro.steps if share or parallel.sharded is not None else []
            for j, i in enumerate(steps):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                level = step_noise_level(noise_level, i)
                x = ro.latents[sl, j]
                v = backend.velocity(x, sigma, cond, s.guidance, uncond)
                res = step_fn(x, v, sigma, sigma_next, level, noise=torch.zeros_like(x), sigma_1=sigma_1)
                log_prob = gaussian_log_prob(ro.next_latents[sl, j], res.mean, res.std, s.log_prob_reduction)[mask]
                entropy = None if perceptual is None else perceptual.entropy[sl, j].to(backend.device)
                inputs = StepInputs(
                    backend=backend,
                    step_fn=step_fn,
                    x=x,
                    sigma=sigma,
                    sigma_next=sigma_next,
                    noise_level=level,
                    sigma_1=sigma_1,
                    cond=cond,
                    uncond=uncond,
                    guidance=s.guidance,
                    result=res,
                    mask=mask,
                    advantages=a,
                    next_latents=ro.next_latents[sl, j],
                    old_mean=ro.means[sl, j].to(backend.device),
                    entropy=entropy,
                )
                for method in methods:
                    log_prob = method.adjust_log_prob(log_prob, inputs)
                loss, stats = clipped_surrogate(log_prob, ro.log_probs[sl, j][mask], a, s.clip_low, s.clip_high)
                stats["policy_loss"] = loss.detach()
                for method in methods:
                    term, extra = method.loss(inputs)
                    if term is not None:
                        loss = loss + term
                    stats.update(extra)
                (loss * share / len(ro.steps)).backward()
                for key, value in stats.items() if share else ():
                    step_stats.setdefault(key, []).append(float(value))
            parallel.average_gradients(params)
            grad_norms.append(float(parallel.clip_grad_norm(params, s.grad_clip)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    out = {key: sum(values) / len(values) for key, values in step_stats.items()}
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out
