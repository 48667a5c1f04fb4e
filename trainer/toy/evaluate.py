"""Acceptance measurements of the embedded tiny model: prompt adherence and relative diversity.

For each prompt, ``n`` samples are drawn with the backend (``trainer.sampling.sample_images``:
the Euler ODE on the model's schedule, CFG, per-sample seeds) and compared with ``n`` images of
the data distribution of the same prompt (``world.sample_scene`` on the prompt's spec):

* adherence: mean :func:`~trainer.world.rewards.adherence_reward` of the samples (and of the data,
  for reference);
* Vendi (q = 1) of the samples and of the data in the toy-encoder space, and their ratio -- how
  much of the prompt's natural variety the model reproduces.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from comfy_pec.encoders import load_encoder

from ..metrics import score_images
from ..world.rewards import adherence_reward
from ..world.scenes import heldout_prompts, index_rng, parse_prompt, render, sample_scene
from .model import DEFAULT_MODEL_DIR


def data_images(prompt: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of the data distribution of ``prompt``: float [n, 3, 64, 64] in [0, 1]."""
    spec = parse_prompt(prompt)
    imgs = [render(sample_scene(index_rng(seed, i), spec)) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def evaluate_toy_model(
    model_dir: str | Path = DEFAULT_MODEL_DIR,
    prompts=None,
    n: int = 64,
    seed: int = 0,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    backend=None,
    encoder=None,
    progress: bool = True,
) -> dict:
    """Adherence and Vendi ratio of the model in ``model_dir`` on ``prompts`` (default: the
    held-out prompts), ``n`` samples each (sample j of every prompt uses seed ``seed + j``).

    Returns ``{"prompts": {prompt: {adherence, adherence_data, vendi, vendi_data, vendi_ratio}},
    "mean_adherence", "mean_vendi_ratio", "min_vendi_ratio", "sampling_s"}`` (floats).
    """
    from ..backends.sd3 import SD3Backend
    from ..sampling import sample_images

    prompts = list(prompts or heldout_prompts())
    backend = backend or SD3Backend.from_pretrained(str(model_dir))
    encoder = encoder or load_encoder("toy")
    seeds = [seed + j for j in range(n)]
    results, elapsed = {}, 0.0
    for k, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        images = sample_images(
            backend,
            [prompt] * n,
            seeds,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            batch_size=64,
            progress=False,
        )
        elapsed += time.perf_counter() - t0
        data = data_images(prompt, n, seed=seed * 1000 + k)
        (model, _), (real, _) = (
            score_images([(x, [prompt] * n)], 1, {"adherence": adherence_reward}, {"toy": encoder})
            for x in (images, data)
        )
        v_model, v_data = float(model["vendi/toy"][0]), float(real["vendi/toy"][0])
        results[prompt] = dict(
            adherence=float(model["adherence"][0]),
            adherence_data=float(real["adherence"][0]),
            vendi=v_model,
            vendi_data=v_data,
            vendi_ratio=v_model / v_data,
        )
        if progress:
            r = results[prompt]
            print(
                f"{prompt:<40} adherence {r['adherence']:.3f} (data {r['adherence_data']:.3f})  "
                f"vendi {v_model:.2f} / {v_data:.2f} = {r['vendi_ratio']:.2f}"
            )
    ratios = [r["vendi_ratio"] for r in results.values()]
    return dict(
        prompts=results,
        mean_adherence=float(np.mean([r["adherence"] for r in results.values()])),
        mean_vendi_ratio=float(np.mean(ratios)),
        min_vendi_ratio=float(np.min(ratios)),
        sampling_s=elapsed,
    )
