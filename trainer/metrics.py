"""The one evaluation path: images, prompts, reward functions and encoders in, metrics out (docs/design.md §7).

:func:`score_images` is used by the run report, `pec eval`, the studies and the toy model's evaluation;
:func:`diversity_metrics` by it and by the training log's per-group Vendi. Images are float
``[B, 3, H, W]`` in [0, 1], prompt-major: ``per_prompt`` images of prompt 0, then of prompt 1, …
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from comfy_pec.diversity import feature_variance, vendi_score

#: images [B, 3, H, W], their prompts [B] → scores [B], or (total [B], {term: [B]}) for a weighted reward
RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
Encoder = Callable[[torch.Tensor], torch.Tensor]


def diversity_metrics(features: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Per-set diversity of ``features`` ``[P, N, D]`` → ``{vendi/name, variance/name, variance_norm/name}``, each
    ``[P]``: Vendi (q = 1, cosine kernel), tr Cov of the raw features, tr Cov of the L2-normalised ones."""
    return {
        f"vendi/{name}": vendi_score(features, q=1.0),
        f"variance/{name}": feature_variance(features),
        f"variance_norm/{name}": feature_variance(features, normalize=True),
    }


def group_vendi(features: torch.Tensor, group_size: int) -> float:
    """Mean per-group Vendi score of ``features`` ``[N, d_f]`` (group-contiguous) — the training log's."""
    return float(vendi_score(features.reshape(-1, group_size, features.shape[-1]), q=1.0).mean())


def image_batches(
    images: torch.Tensor, prompts: Sequence[str], batch_size: int
) -> Iterable[tuple[torch.Tensor, list[str]]]:
    """``(images, prompts)`` chunks of an in-memory prompt-major batch, one prompt per image."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], list(prompts[start : start + batch_size])


@torch.no_grad()
def score_images(
    batches: Iterable[tuple[torch.Tensor, Sequence[str]]],
    num_prompts: int,
    rewards: Mapping[str, RewardFn],
    encoders: Mapping[str, Encoder],
    device="cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-prompt metrics of ``num_prompts`` × N images given as prompt-major ``(images, prompts)`` chunks.

    Every reward is the mean over a prompt's images (a weighted reward adds ``name/term`` for each of its
    terms); every encoder gives the :func:`diversity_metrics` of a prompt's images in its feature space.
    Returns ``(metrics {name: [P]}, features {encoder: [P, N, D]})``, float32 on the CPU.
    """
    scores: dict[str, list[torch.Tensor]] = {}
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    for images, prompts in batches:
        for name, fn in rewards.items():
            out = fn(images, list(prompts))
            total, parts = out if isinstance(out, tuple) else (out, {})
            for key, value in {name: total, **{f"{name}/{k}": v for k, v in parts.items()}}.items():
                scores.setdefault(key, []).append(value.float().cpu())
        for name, encoder in encoders.items():
            feats[name].append(encoder(images.to(device)).float().cpu())
    metrics = {name: torch.cat(v).reshape(num_prompts, -1).nanmean(1) for name, v in scores.items()}
    features = {}
    for name, chunks in feats.items():
        x = torch.cat(chunks)
        features[name] = x.reshape(num_prompts, -1, x.shape[-1])
        metrics.update(diversity_metrics(features[name], name))
    return metrics, features
