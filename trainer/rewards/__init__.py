"""Reward registry: named reward functions, combined with weights.

A reward maps images ``[B, 3, H, W]`` (or ComfyUI ``[B, H, W, 3]``) in [0, 1] and their prompts to
a float32 score ``[B]``. :data:`REWARDS` maps a name to a factory ``factory(path=None, device=None)``
called once per run: ``path`` is the reward model's hub id or local path (None = its published
weights), ``device`` where it runs (None = CUDA when available). The real models load lazily —
importing this package imports none of them:

========================  ==========================================================  ============
name                      definition                                                  module
========================  ==========================================================  ============
``pickscore``             ``exp(logit_scale) · cos(img, txt)`` (PickScore_v1, CLIP-H)  clip_rewards
``clip_score``            ``max(cos(img, txt), 0)`` (CLIP ViT-L/14)                   clip_rewards
``hpsv21``                ``cos(img, txt)`` (open_clip ViT-H-14 + HPS v2.1 weights)    hps
``aesthetic``             MLP on the L2-normalised SigLIP pooled feature (v2.5)       aesthetic
``imagereward``           ``(MLP(BLIP ITM [CLS]) - μ) / σ`` (ImageReward v1.0)         image_reward
========================  ==========================================================  ============
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from comfy_pec import PECError

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def _toy(name: str) -> Callable[..., RewardFn]:
    def factory(path: str | None = None, device=None) -> RewardFn:
        if path is not None:
            raise PECError(f"reward {name!r} is model-free: it takes no path (got {path!r})")
        from trainer.world import rewards

        return getattr(rewards, f"{name.removeprefix('toy_')}_reward")

    return factory


def _model(module: str, cls: str) -> Callable[..., RewardFn]:
    """A factory that imports ``trainer.rewards.<module>`` only when the reward is built."""

    def factory(path: str | None = None, device=None) -> RewardFn:
        from importlib import import_module

        return getattr(import_module(f"trainer.rewards.{module}"), cls)(path=path, device=device)

    return factory


#: name -> factory ``(path=None, device=None)`` building the reward function (called once per run).
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "toy_adherence": _toy("toy_adherence"),
    "toy_preference": _toy("toy_preference"),
    "pickscore": _model("clip_rewards", "PickScore"),
    "clip_score": _model("clip_rewards", "CLIPScore"),
    "hpsv21": _model("hps", "HPSv21"),
    "aesthetic": _model("aesthetic", "AestheticV25"),
    "imagereward": _model("image_reward", "ImageReward"),
}


@dataclass
class WeightedReward:
    """``Σ_k w_k · r_k(images, prompts)``; also returns each term for the logs."""

    terms: list[tuple[str, float, RewardFn]]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: fn(images, list(prompts)).float().cpu() for name, _, fn in self.terms}
        total = sum(weight * parts[name] for name, weight, _ in self.terms)
        return total, parts


def build_reward(terms: Sequence, device=None) -> WeightedReward:
    """From config terms (objects with ``.name``, ``.weight`` and optionally ``.path``).

    Only the options that are set reach the factory, so zero-argument factories stay valid.
    """
    built = []
    for term in terms:
        if term.name not in REWARDS:
            raise PECError(f"unknown reward {term.name!r}; available: {', '.join(sorted(REWARDS))}")
        options = {"path": getattr(term, "path", None), "device": device}
        fn = REWARDS[term.name](**{k: v for k, v in options.items() if v is not None})
        built.append((term.name, float(term.weight), fn))
    return WeightedReward(built)
