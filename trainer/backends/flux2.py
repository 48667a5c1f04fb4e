"""FLUX.2 backends on diffusers' ``Flux2Pipeline`` (dev: Mistral-Small-3 text encoder, distilled guidance
embedding) and ``Flux2KleinPipeline`` (klein: Qwen3 text encoder; the distilled 4-step models have no
guidance, the base models use CFG).

Latent layout ``[B, 4·C, H/(2f), W/(2f)]`` (f = VAE scale factor, C = 32): the VAE latent mean with every
2×2 patch folded into the channels (channel ``4·c + 2·dy + dx``, as FLUX.1's
:func:`~trainer.backends.flux.pack_latents`), then normalised per channel by the VAE's batch-norm
statistics, ``z = (patches - bn_mean) / sqrt(bn_var + eps)``. Its row-major flatten is the token
sequence the transformer reads, with 4-D position ids ``(t=0, row, column, l=0)``.

Conditioning: hidden states of three text-encoder layers, stacked into ``[B, L, 3·D]`` over the whole
padded sequence (``max_sequence_length`` tokens; FLUX.2 attends to the padding too, so nothing is cut),
text ids ``(0, 0, 0, l)``. There is no pooled embedding: ``pooled`` is ``[B, 0]``. The transformer takes
``timestep = σ`` and predicts ``v = ε - x0``. The schedule is the scheduler config's dynamic shift with
FLUX.2's empirical ``μ`` of the token count and the step count (:func:`comfy_pec.sde.flux2_mu`).

LoRA files are written and read in the original BFL layout (:func:`comfy_pec.lora_format.flux2_to_bfl`).
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.lora_format import flux2_from_bfl, load_lora
from comfy_pec.sde import flux2_mu, scheduler_schedule

from .base import PromptEmbeds, Sigma, check_lora_fits
from .flux import pack_latents, unpack_latents
from .pipeline import PipelineBackend

#: Flow-Factory's FLUX.2-dev GRPO settings (examples/grpo/lora/flux2/t2i.yaml).
FLUX2_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 8,
    "eval_num_steps": 28,
    "guidance_scale": 4.0,
    "noise_level": 1.0,
    "max_sequence_length": 512,
}
#: Flow-Factory's FLUX.2-klein GRPO settings (examples/grpo/lora/flux2_klein/default.yaml): 4-step distilled.
FLUX2_KLEIN_DEFAULTS: dict[str, Any] = {
    "resolution": 384,
    "num_steps": 4,
    "eval_num_steps": 10,
    "guidance_scale": 1.0,
    "noise_level": 0.5,
    "max_sequence_length": 512,
}


def position_ids(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """Image token ids ``[B, h·w, 4]``: (0, row, column, 0), row-major."""
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(1, -1, 4).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None) -> torch.Tensor:
    """Text token ids ``[B, L, 4]``: (0, 0, 0, l)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1)


class Flux2Backend(PipelineBackend):
    """FLUX.2-dev: one forward per step, ``guidance_scale`` fed to the distilled guidance embedding."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    transformer_class = "Flux2Transformer2DModel"
    builtin_defaults = FLUX2_DEFAULTS
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, defaults: dict[str, Any] | None = None, source: str = "<in memory>", **options):
        super().__init__(pipe, defaults, source, **options)
        # dev and klein share the keys; the pipeline says which one this is (the LoRA metadata names it).
        self.architecture = "flux2" if self.family == "flux2" else "flux2-klein"

    # ---- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(embeds, embeds.new_zeros(embeds.shape[0], 0))

    # ---- velocity -----------------------------------------------------------------------------

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: Sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        """Velocity in the packed layout; ``guidance_scale`` is the distilled guidance, ``uncond`` is unused."""
        batch = latents.shape[0]
        guidance = torch.full((batch,), float(guidance_scale), device=latents.device)
        return self._forward(latents, self._timestep(sigma, latents), cond, guidance)

    def _timestep(self, sigma: Sigma, latents: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])

    def _forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        device = latents.device
        out = self.network(
            hidden_states=latents.to(self.dtype).flatten(2).transpose(1, 2),  # [B, L, 4C], row-major as the ids
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=text_ids(batch, cond.embeds.shape[1], device),
            img_ids=position_ids(batch, height, width, device),
            return_dict=False,
        )[0]
        return out.float().transpose(1, 2).reshape(batch, channels, height, width)

    # ---- images <-> latents -------------------------------------------------------------------

    def _bn_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps)
        return bn.running_mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.vae.device, torch.float32) * 2.0 - 1.0
        mean, std = self._bn_stats()
        return (pack_latents(self.vae.encode(pixels).latent_dist.mean) - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_stats()
        z = unpack_latents(latents.to(self.vae.device, torch.float32) * std + mean)
        return (self.vae.decode(z, return_dict=False)[0] / 2.0 + 0.5).clamp(0.0, 1.0)

    # ---- layout and schedule ------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (4 * self.vae.config.latent_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor * 2
        tokens = (height // f) * (width // f)
        return scheduler_schedule(num_steps, tokens, dict(self.pipe.scheduler.config), mu=flux2_mu(tokens, num_steps))

    # ---- LoRA ---------------------------------------------------------------------------------

    def load_lora(self, path: str, scale: float = 1.0, adapter_name: str = "pec") -> None:
        """A FLUX.2 LoRA in the BFL layout (PEC's, ai-toolkit's) or in diffusers module paths."""
        tensors, _ = load_lora(path)
        tensors = flux2_from_bfl(tensors)
        check_lora_fits(self.transformer, tensors, path, self.family)
        self.pipe.load_lora_weights(tensors, adapter_name=adapter_name)
        self.pipe.set_adapters([adapter_name], [scale])


class Flux2KleinBackend(Flux2Backend):
    """FLUX.2-klein: no guidance embedding; CFG ``v_u + g·(v_c - v_u)`` for ``g > 1`` on the undistilled
    base models (the pipeline's ``is_distilled`` models ignore ``g``, as the pipeline does)."""

    family = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    builtin_defaults = FLUX2_KLEIN_DEFAULTS

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: Sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        timestep = self._timestep(sigma, latents)
        if guidance_scale <= 1.0 or self.pipe.config.is_distilled:
            return self._forward(latents, timestep, cond, None)
        uncond = uncond if uncond is not None else self.empty_embeds(latents.shape[0])
        both = self._forward(
            torch.cat([latents, latents]), torch.cat([timestep, timestep]), PromptEmbeds.cat([uncond, cond]), None
        )
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
