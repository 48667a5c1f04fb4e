"""What the trainer needs from a flow-matching text-to-image model, independent of its family.

A backend owns the diffusers modules of one model (transformer, VAE, text encoders) and offers the
few operations the sampler and the GRPO loop use: encode prompts, predict the velocity (with
classifier-free guidance when the family uses it), move between images and latents, give the sigma
schedule, and load a LoRA file. SD3 and FLUX differ in latent layout (FLUX packs 2×2 patches into
tokens), guidance (CFG vs a distilled guidance embedding) and schedule shift; all of that stays
behind this interface, and the flow math (``comfy_pec.sde``) sees only ``[B, ...]`` latents.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from comfy_pec import PECError

Sigma = float | torch.Tensor

#: the name of the optional JSON file in a model directory that holds its sampling defaults.
DEFAULTS_FILE = "pec.json"


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of prompts.

    Attributes:
        embeds: token embeddings ``[B, L, D]`` (the transformer's ``encoder_hidden_states``).
        pooled: pooled embeddings ``[B, P]`` (SD3/FLUX ``pooled_projections``).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt ``n`` times in a row (a GRPO group): ``[B, ...]`` → ``[B·n, ...]``."""
        return PromptEmbeds(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def select(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[index], self.pooled[index])

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([i.embeds for i in items]), torch.cat([i.pooled for i in items]))


def read_defaults(path: str, builtin: dict[str, Any]) -> dict[str, Any]:
    """``builtin`` updated by ``<path>/pec.json`` when ``path`` is a local model directory holding one."""
    defaults = dict(builtin)
    file = os.path.join(path, DEFAULTS_FILE)
    if os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as handle:
                defaults.update(json.load(handle))
        except (OSError, ValueError) as err:
            raise PECError(f"{file}: cannot read the model's sampling defaults ({err})") from None
    return defaults


def load_lora_for(transformer: torch.nn.Module, path: str, family: str) -> dict[str, torch.Tensor]:
    """Read a LoRA file and check it fits ``transformer``: every module exists with matching shapes.

    Returns the file's tensors (``transformer.<module>.lora_A/B.weight``). A LoRA made for another
    base model is a :class:`PECError` naming the first module that does not fit.
    """
    from comfy_pec.lora_format import load_lora

    tensors, _ = load_lora(path)  # LoraFormatError (a PECError) on anything that is not a LoRA
    check_lora_fits(transformer, tensors, path, family)
    return tensors


def check_lora_fits(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str, family: str) -> None:
    """:func:`load_lora_for`'s check on tensors already read (``<any prefix><module>.lora_A/B.weight``)."""
    from comfy_pec.lora_format import guess_architecture, module_path

    modules = dict(transformer.named_modules())
    for key, tensor in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = module_path(key)
        target = modules.get(name)
        b_rows = tensors[key.replace(".lora_A.", ".lora_B.")].shape[0]
        fits = target is not None and (getattr(target, "in_features", None), getattr(target, "out_features", None)) == (
            tensor.shape[1],
            b_rows,
        )
        if not fits:
            found = (
                "no such module"
                if target is None
                else f"module is {type(target).__name__} {tuple(target.weight.shape)}"
            )
            raise PECError(
                f"{path}: LoRA module {name} [{b_rows} x {tensor.shape[1]}] does not fit this {family} model "
                f"({found}); the LoRA was made for another base model (its keys look like "
                f"{guess_architecture(tensors)})"
            )


class Backend(abc.ABC):
    """Interface of a model family. Latents are float tensors ``[B, ...]`` in the model's own layout."""

    #: family name, e.g. "sd3" or "flux".
    family: str
    #: sampling defaults: resolution, num_steps, guidance_scale, noise_level, shift, ...
    defaults: dict[str, Any]
    transformer: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def network(self) -> torch.nn.Module:
        """The module the forward runs through: the transformer, or what :meth:`set_network` put around it."""
        wrapped = getattr(self, "_network", None)
        return self.transformer if wrapped is None else wrapped

    def set_network(self, module: torch.nn.Module) -> None:
        """Run forwards through ``module`` (``torch.compile`` or FSDP around the transformer); the adapter
        switches and the parameters stay on ``self.transformer``."""
        self._network = module

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Text conditioning for ``prompts`` (differentiable when grad is enabled)."""

    @abc.abstractmethod
    def velocity(
        self,
        latents: torch.Tensor,
        sigma: Sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        """Velocity ``v ≈ ε - x0`` at noise level ``sigma`` (float or ``[B]``), float32, latents' shape."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → model latents (deterministic: the posterior mean)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents → images ``[B, 3, H, W]`` in [0, 1], float32."""

    @abc.abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent (without batch) for an image of ``height × width`` pixels."""

    @abc.abstractmethod
    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """Sigmas ``[num_steps + 1]`` from 1 down to 0 for this family and resolution."""

    @abc.abstractmethod
    def load_lora(self, path: str, scale: float = 1.0, adapter_name: str = "pec") -> None:
        """Apply a LoRA file at ``scale``; a file for another architecture is a :class:`PECError`."""

    def cache_prompts(self, prompts: list[str]) -> None:  # noqa: B027 -- an optional hook, a no-op by default
        """Encode ``prompts`` ahead of use where the backend caches embeddings (default: nothing to do)."""

    def empty_embeds(self, batch: int) -> PromptEmbeds:
        """The unconditional (empty-prompt) embedding for CFG, computed once and repeated."""
        cached = getattr(self, "_empty", None)
        if cached is None:
            with torch.no_grad():
                cached = self.encode_prompts([""])
            self._empty = cached
        return cached.repeat(batch)
