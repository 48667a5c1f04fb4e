"""Stable Diffusion 3 / 3.5 backend on diffusers' ``StableDiffusion3Pipeline``.

The embedded tiny model (``trainer/toy/pretrained``) is an SD3 pipeline too, so the trainer drives
it through exactly this code. Latents are ``[B, C, H/f, W/f]`` (f = VAE scale factor), normalised as
SD3 does: ``z = (vae_mean - shift_factor) · scaling_factor``. The transformer takes
``timestep = 1000·σ`` and predicts the flow velocity ``v = ε - x0``.
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_pec import PECError
from comfy_pec.sde import sd3_schedule

from .base import PromptEmbeds, Sigma
from .pipeline import PipelineBackend

#: Flow-GRPO's SD3.5-M settings (docs/design.md §4); a model directory's pec.json overrides them.
SD3_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 10,
    "eval_num_steps": 40,
    "guidance_scale": 4.5,
    "noise_level": 0.7,
    "shift": 3.0,
    "max_sequence_length": 256,
}


class SD3Backend(PipelineBackend):
    """SD3/SD3.5 (CLIP-L + CLIP-G, optional T5) with classifier-free guidance.

    T5 is left out unless ``use_t5`` (Flow-GRPO trains without it; its token slots are zeros then).
    """

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    builtin_defaults = SD3_DEFAULTS
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @classmethod
    def optional_components(cls, use_t5: bool | None) -> dict[str, None]:
        return {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    # ---- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
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
        batch = latents.shape[0]
        dtype = self.dtype
        timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=latents.device) * 1000.0).expand(batch)
        if guidance_scale == 1.0:
            return self._forward(latents.to(dtype), timestep, cond).float()
        uncond = uncond if uncond is not None else self.empty_embeds(batch)
        # One batched forward for both branches (uncond first, as diffusers does).
        both = self._forward(
            torch.cat([latents, latents]).to(dtype), torch.cat([timestep, timestep]), PromptEmbeds.cat([uncond, cond])
        ).float()
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def _forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        dtype = self.dtype
        return self.network(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]

    # ---- layout and schedule ------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        return sd3_schedule(num_steps, shift=float(self.defaults["shift"]))
