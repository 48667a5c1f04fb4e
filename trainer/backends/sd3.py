"""Stable Diffusion 3 / 3.5 backend on diffusers' ``StableDiffusion3Pipeline``.

The embedded tiny model (``trainer/toy/pretrained``) is an SD3 pipeline too, so the trainer drives
it through exactly this code. Latents are ``[B, C, H/f, W/f]`` (f = VAE scale factor), normalised as
SD3 does: ``z = (vae_mean - shift_factor) · scaling_factor``. The transformer takes
``timestep = 1000·σ`` and predicts the flow velocity ``v = ε - x0``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from comfy_pec import PECError
from comfy_pec.lora_format import guess_architecture
from comfy_pec.sde import sd3_schedule

from .base import Backend, PromptEmbeds, Sigma, load_lora_for, read_defaults

#: Flow-GRPO's SD3.5-M settings (DESIGN §4); a model directory's pec.json overrides them.
SD3_DEFAULTS: dict[str, Any] = {
    "resolution": 512,
    "num_steps": 10,
    "eval_num_steps": 40,
    "guidance_scale": 4.5,
    "noise_level": 0.7,
    "shift": 3.0,
    "max_sequence_length": 256,
}


class SD3Backend(Backend):
    """SD3/SD3.5 (CLIP-L + CLIP-G, optional T5) with classifier-free guidance."""

    family = "sd3"

    def __init__(self, pipe, defaults: Optional[dict[str, Any]] = None, source: str = "<in memory>"):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.source = source
        self.defaults = {**SD3_DEFAULTS, **(defaults or {})}
        self.max_sequence_length = int(self.defaults["max_sequence_length"])
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # For LoRA metadata: pec.json may name it (the embedded model: "sd3-toy"); else from the weights.
        self.architecture = self.defaults.get("architecture") or guess_architecture(
            {k: v.shape for k, v in self.transformer.state_dict().items()}
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        revision: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        use_t5: bool = False,
    ) -> "SD3Backend":
        """Load a diffusers SD3 pipeline from a hub id or a local directory.

        T5 is left out unless ``use_t5`` (Flow-GRPO trains without it; its token slots are zeros then).
        The VAE is kept in float32: decoding is part of the reward and of perceptual entropy.
        """
        from diffusers import StableDiffusion3Pipeline

        extra = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path_or_id, revision=revision, torch_dtype=dtype, **extra)
        except (OSError, ValueError) as err:
            raise PECError(f"cannot load an SD3 pipeline from {path_or_id!r}: {err}") from None
        pipe.vae.to(torch.float32)
        pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.eval().requires_grad_(False)
        defaults = read_defaults(path_or_id, {}) if os.path.isdir(path_or_id) else {}
        return cls(pipe, defaults, source=path_or_id)

    # ---- text ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
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
        uncond: Optional[PromptEmbeds] = None,
    ) -> torch.Tensor:
        batch = latents.shape[0]
        dtype = self.transformer.dtype
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
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]

    # ---- images <-> latents -------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        pixels = images.to(self.device, torch.float32) * 2.0 - 1.0
        mean = self.vae.encode(pixels).latent_dist.mean
        return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents.to(torch.float32) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (self.vae.decode(z, return_dict=False)[0] / 2.0 + 0.5).clamp(0.0, 1.0)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f:
            raise PECError(f"image size {height}x{width} must be a multiple of {f} for this model")
        return (self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        return sd3_schedule(num_steps, shift=float(self.defaults["shift"]))

    # ---- LoRA ---------------------------------------------------------------------------------

    def load_lora(self, path: str, scale: float = 1.0, adapter_name: str = "pec") -> None:
        tensors = load_lora_for(self.transformer, path, self.family)
        self.pipe.load_lora_weights(tensors, adapter_name=adapter_name)
        self.pipe.set_adapters([adapter_name], [scale])
