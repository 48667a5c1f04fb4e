"""FLUX.1 backend on diffusers' ``FluxPipeline`` (FLUX.1-dev: guidance-distilled, no CFG).

Latent layout ``[B, 4·C, H/(2f), W/(2f)]`` (f = VAE scale factor, C = VAE latent channels): the
normalised VAE latent ``z = (vae_mean - shift_factor) · scaling_factor`` with every 2×2 patch folded
into the channels, channel ``4·c + 2·dy + dx``. Its row-major flatten over the grid is exactly the
packed token sequence ``[B, L, 4·C]`` FLUX's transformer reads (diffusers' ``_pack_latents``), and
keeping the grid lets the backend build the latent image ids for any aspect ratio.

Conditioning: the CLIP-L pooled embedding (``pooled_projections``) and the T5 token sequence
(``encoder_hidden_states``, text ids all zero). The transformer takes ``timestep = σ`` and the
distilled guidance strength as an embedding (both scaled by 1000 inside the model); it predicts the
flow velocity ``v = ε - x0``. The schedule is the dynamic shift of the packed token count L
(:func:`comfy_pec.sde.flux_schedule`).
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import flux_schedule

from .base import PromptEmbeds, Sigma
from .pipeline import PipelineBackend

#: Flow-GRPO's FLUX.1-dev settings (docs/design.md §4); a model directory's pec.json overrides them.
FLUX_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 6,
    "eval_num_steps": 28,
    "guidance_scale": 3.5,
    "noise_level": 0.9,
    "max_sequence_length": 512,
}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, h, w]`` (h, w even) → ``[B, 4·C, h/2, w/2]``, 2×2 patches in the channels."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, 4·C, h', w']`` → ``[B, C, 2h', 2w']``."""
    b, c4, h, w = latents.shape
    patches = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c4 // 4, h * 2, w * 2)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE positions of the packed tokens ``[h·w, 3]``: (0, row, column), row-major."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxBackend(PipelineBackend):
    """FLUX.1 (CLIP-L pooled + T5-XXL tokens) with the distilled guidance embedding; no CFG."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    builtin_defaults = FLUX_DEFAULTS
    text_encoder_names = ("text_encoder", "text_encoder_2")

    @classmethod
    def optional_components(cls, use_t5: bool | None) -> dict[str, None]:
        if use_t5 is False:
            raise PECError("FLUX reads its prompt tokens from T5: model.use_t5 cannot be false for a flux model")
        return {}

    # ---- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(embeds, pooled)

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
        batch, channels, height, width = latents.shape
        device = latents.device
        timestep = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(batch)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=device)
        tokens = latents.to(self.dtype).flatten(2).transpose(1, 2)  # [B, L, 4C], row-major as the ids
        out = self.network(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=device),
            img_ids=latent_image_ids(height, width, device),
            return_dict=False,
        )[0]
        return out.float().transpose(1, 2).reshape(batch, channels, height, width)

    # ---- layout and schedule ------------------------------------------------------------------

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (self.vae.config.latent_channels * 4, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor * 2
        return flux_schedule(num_steps, (height // f) * (width // f))
