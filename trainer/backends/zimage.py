"""Z-Image backend on diffusers' ``ZImagePipeline`` (Z-Image-Turbo: distilled, no CFG; Z-Image base: CFG).

Latent layout ``[B, C, H/f, W/f]`` (f = VAE scale factor, C = 16): the normalised VAE latent
``z = (vae_mean - shift_factor) · scaling_factor`` of the FLUX.1 VAE. The transformer patchifies 2×2
itself, so nothing is packed here; it takes a list of per-sample latents ``[C, 1, h, w]``.

Conditioning: the second-to-last hidden state of the Qwen3 text encoder over the chat-formatted
prompt, only the real (unmasked) tokens. :class:`~trainer.backends.base.PromptEmbeds` holds them padded
to ``max_sequence_length``: ``embeds`` ``[B, L, D]`` and, as Z-Image has no pooled embedding, the
token mask ``[B, L]`` (1.0 = real token) in ``pooled`` (the batch-wise ops and the prompt cache treat
both alike).

The transformer reads ``t = 1 - σ`` and predicts ``x0 - ε``: the velocity ``v = ε - x0`` is its
negation. Guidance is the pipeline's: ``v = v_c + g·(v_c - v_u)`` for ``g > 0`` (Turbo uses g = 0).
The schedule is the one the pipeline's scheduler config gives (Z-Image-Turbo: static shift 3).
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import scheduler_schedule

from .base import PromptEmbeds, Sigma
from .pipeline import PipelineBackend

#: Flow-Factory's Z-Image-Turbo GRPO settings (examples/grpo/lora/z_image_turbo/default.yaml).
ZIMAGE_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 6,
    "eval_num_steps": 10,
    "guidance_scale": 0.0,
    "noise_level": 0.7,
    "max_sequence_length": 512,
}


def padded_embeds(embeds: list[torch.Tensor], length: int) -> PromptEmbeds:
    """Per-prompt token embeddings ``[L_i, D]`` → ``embeds`` ``[B, length, D]`` (zero padded at the end)
    and the token mask ``[B, length]`` (float, 1.0 = real token) in ``pooled``. The pipelines' encoders
    truncate at ``length`` already."""
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, device=out.device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1.0
    return PromptEmbeds(out, mask)


def trim_padding(cond: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [B, L', D], mask [B, L'] bool)`` cut after the longest prompt's last real token
    (the padding is at the end, so nothing real is lost and attention skips L - L' dead tokens)."""
    mask = cond.pooled > 0.5
    length = max(int(mask.sum(1).max()), 1)
    return cond.embeds[:, :length], mask[:, :length]


class ZImageBackend(PipelineBackend):
    """Z-Image (Qwen3 text encoder, single-stream DiT with refiner blocks) with the pipeline's CFG rule."""

    family = "zimage"
    pipeline_class = "ZImagePipeline"
    transformer_class = "ZImageTransformer2DModel"
    builtin_defaults = ZIMAGE_DEFAULTS
    text_encoder_names = ("text_encoder",)

    # ---- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return padded_embeds(embeds, self.max_sequence_length)

    # ---- velocity -----------------------------------------------------------------------------

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: Sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 0.0,
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        batch = latents.shape[0]
        timestep = (1.0 - torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)).expand(batch)
        if guidance_scale <= 0.0:
            return self._forward(latents, timestep, cond)
        uncond = uncond if uncond is not None else self.empty_embeds(batch)
        both = self._forward(
            torch.cat([latents, latents]), torch.cat([timestep, timestep]), PromptEmbeds.cat([cond, uncond])
        )
        v_cond, v_uncond = both.chunk(2)
        return v_cond + guidance_scale * (v_cond - v_uncond)

    def _forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        """``-transformer(...)``: the velocity, float32, ``[B, C, h, w]``."""
        embeds, mask = trim_padding(cond)
        embeds = embeds.to(self.dtype)
        frames = list(latents.to(self.dtype).unsqueeze(2).unbind(0))  # per sample [C, 1, h, w]
        out = self.network(frames, timestep, [e[m] for e, m in zip(embeds, mask)], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # ---- layout and schedule ------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor * 2
        return scheduler_schedule(num_steps, (height // f) * (width // f), dict(self.pipe.scheduler.config))
