"""Qwen-Image backend on diffusers' ``QwenImagePipeline`` (true CFG with norm rescaling).

Latent layout ``[B, 4·C, H/(2f), W/(2f)]`` as FLUX.1 (:func:`~trainer.backends.flux.pack_latents`):
the Qwen-Image VAE latent (a video VAE run on one frame) normalised per channel,
``z = (vae_mean - latents_mean) / latents_std``, with 2×2 patches folded into the channels; its
row-major flatten is the packed token sequence the transformer reads.

Conditioning: the last hidden state of Qwen2.5-VL over the pipeline's prompt template, template
tokens dropped, padded to ``max_sequence_length`` with the token mask ``[B, L]`` in ``pooled`` (as
:mod:`trainer.backends.zimage`). The transformer takes ``timestep = σ`` and predicts ``v = ε - x0``.

Guidance (``true_cfg_scale`` of the pipeline, on when > 1): ``v' = v_u + s·(v_c - v_u)``, then
rescaled per token to the conditional norm, ``v = v' · ‖v_c‖ / ‖v'‖`` (norms over the 4·C channels).
The schedule is the pipeline's scheduler config (dynamic shift, stretched to end at 0.02).
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import scheduler_schedule

from .base import PromptEmbeds, Sigma
from .flux import pack_latents, unpack_latents
from .pipeline import PipelineBackend
from .zimage import padded_embeds, trim_padding

#: Flow-Factory's Qwen-Image GRPO settings (examples/grpo/lora/qwen_image/default.yaml).
QWENIMAGE_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 10,
    "eval_num_steps": 28,
    "guidance_scale": 4.0,
    "noise_level": 1.0,
    "max_sequence_length": 512,
}


class QwenImageBackend(PipelineBackend):
    """Qwen-Image (Qwen2.5-VL text encoder, MMDiT) with true CFG."""

    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    builtin_defaults = QWENIMAGE_DEFAULTS
    text_encoder_names = ("text_encoder",)

    @staticmethod
    def _vae_scale_factor(vae) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    # ---- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, mask = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        return padded_embeds([e[: int(n)] for e, n in zip(embeds, lengths)], self.max_sequence_length)

    # ---- velocity -----------------------------------------------------------------------------

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: Sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        batch = latents.shape[0]
        timestep = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(batch)
        if guidance_scale <= 1.0:
            return self._forward(latents, timestep, cond)
        uncond = uncond if uncond is not None else self.empty_embeds(batch)
        # One batched forward for both branches: the mask hides each one's padding.
        both = self._forward(
            torch.cat([latents, latents]), torch.cat([timestep, timestep]), PromptEmbeds.cat([cond, uncond])
        )
        v_cond, v_uncond = both.chunk(2)
        combined = v_uncond + guidance_scale * (v_cond - v_uncond)
        return combined * (v_cond.norm(dim=1, keepdim=True) / combined.norm(dim=1, keepdim=True))

    def _forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        embeds, mask = trim_padding(cond)
        out = self.network(
            hidden_states=latents.to(self.dtype).flatten(2).transpose(1, 2),  # [B, L, 4C], row-major
            timestep=timestep,
            encoder_hidden_states=embeds.to(self.dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height, width)]] * batch,
            return_dict=False,
        )[0]
        return out.float().transpose(1, 2).reshape(batch, channels, height, width)

    # ---- images <-> latents -------------------------------------------------------------------

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=self.vae.device).view(shape)
        return mean, torch.tensor(cfg.latents_std, device=self.vae.device).view(shape)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.vae.device, torch.float32) * 2.0 - 1.0
        mean = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]  # one frame
        latents_mean, latents_std = self._latent_stats()
        return pack_latents((mean - latents_mean) / latents_std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents_mean, latents_std = self._latent_stats()
        z = unpack_latents(latents.to(self.vae.device, torch.float32)) * latents_std + latents_mean
        images = self.vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
        return (images / 2.0 + 0.5).clamp(0.0, 1.0)

    # ---- layout and schedule ------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (4 * self.vae.config.z_dim, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor * 2
        return scheduler_schedule(num_steps, (height // f) * (width // f), dict(self.pipe.scheduler.config))
