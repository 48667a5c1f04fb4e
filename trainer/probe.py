"""The fixed probe of the paradox (docs/design.md §9): the same measurement of the current policy every k
iterations, apart from training.

Training rows mix policy changes with which prompts, seeds and SDE window an iteration drew; the probe
fixes all three. Its closed-form policy entropy depends on the schedule alone, so it is identical in
every probe, while its perceptual entropy Ĥ_A and the diversity of its images follow the policy: the
paper's Fig. 2, measured the same way every time. It draws nothing from the run's generators, so a
run with probes trains exactly as one without, and a resumed run probes what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import step_entropy

from .backends import Backend
from .metrics import diversity_metrics
from .perceptual import embed_latents
from .rollout import RolloutSettings, Schedule, perceive, rollout


@dataclass(frozen=True)
class Probe:
    """What one probe samples: every prompt at every seed, SDE on ``steps``, ODE elsewhere."""

    prompts: list[str]
    seeds: list[int]
    steps: list[int]
    every: int  # iterations between probes; 0 = never

    def due(self, iteration: int, iterations: int) -> bool:
        """Probe before iteration ``iteration`` (multiples of ``every``) and after the last (``iterations``)."""
        return self.every > 0 and (iteration % self.every == 0 or iteration == iterations)


def make_probe(config, eval_prompts: list[str], num_steps: int) -> Probe:
    """``config.probe`` over the run's evaluation prompts; a step outside the trainable ones is an error."""
    p = config.probe
    bad = [s for s in p.steps if not 0 <= s < num_steps - 1]
    if p.every and bad:
        raise PECError(f"probe.steps {bad} are not among the {num_steps - 1} trainable steps (0..{num_steps - 2})")
    return Probe(eval_prompts[: p.prompts], list(p.seeds), sorted(set(p.steps)), p.every)


@torch.no_grad()
def run_probe(
    probe: Probe,
    iteration: int,
    backend: Backend,
    encoder,
    settings: RolloutSettings,
    decode: str = "noisy",
    chunk_size: int = 32,
) -> dict[str, Any]:
    """One probe of the current policy → its ``log.jsonl`` row (``"probe": true``)."""
    per_prompt = len(probe.seeds)
    prompts = [p for p in probe.prompts for _ in probe.seeds]
    seeds = torch.tensor([s for _ in probe.prompts for s in probe.seeds])
    mask = torch.zeros(settings.num_steps, dtype=torch.bool)
    mask[probe.steps] = True
    ro = rollout(backend, prompts, seeds, Schedule(settings.sigmas, mask, settings.noise_level), settings)
    stats = perceive(backend, encoder, ro, settings.sigmas, settings.guidance, decode, chunk_size, settings.batch_size)
    features = embed_latents(lambda x: x, encoder, ro.images.to(backend.device), chunk_size).cpu()
    diversity = diversity_metrics(features.reshape(len(probe.prompts), per_prompt, -1), "probe")
    entropy = stats.entropy.reshape(len(probe.prompts), per_prompt, -1).mean(1)  # Ĥ_A per prompt and step
    return {
        "probe": True,
        "iteration": iteration,
        "probe_steps": ro.steps,
        "policy_entropy": float(step_entropy(ro.stds, 1).mean()),
        "perceptual_entropy": float(entropy.mean()),
        "vendi": float(diversity["vendi/probe"].mean()),
        "feature_variance": float(diversity["variance/probe"].mean()),
    }
