"""The embedded tiny model (``trainer/toy/pretrained``, a diffusers SD3 pipeline: 6-block MMDiT with hidden
128 in 4 heads, two tiny CLIP text encoders, a 16-channel VAE) as ComfyUI MODEL, CLIP and VAE, so every
workflow runs on a CPU in seconds and a ``pec demo`` LoRA can be tried in ComfyUI.

- MODEL is native: ComfyUI's own SD3 model class (``comfy.model_base.SD3``, its MMDiT, its flow sampling),
  so KSampler, SamplerCustom(Advanced), ModelSamplingSD3 and LoraLoaderModelOnly work unchanged. ComfyUI's
  model detection reads depth = hidden / 64 and builds that many blocks of 64-wide heads; this model has 6
  blocks of 32-wide heads, so the loader gives the block count explicitly, sets the head count of each
  attention and moves the last block's context modulation to where ComfyUI's diffusers conversion
  (which assumes depth blocks) did not put it (:func:`load_embedded_model`). The sampling shift and the latent scale/shift come from the
  pipeline's ``pec.json`` and VAE config instead of SD3's.
- CLIP and VAE wrap the diffusers components: ComfyUI builds its CLIP-L/G text encoders from fixed
  configs with its own 49408-token vocabulary (this model has 687 tokens, 3 layers of width 64), and its
  VAE with 128 base channels and 32-group norms (this one has 16 channels, 8 groups). The wrappers offer
  the methods the stock nodes call: ``tokenize`` / ``encode_from_tokens_scheduled`` (CLIPTextEncode) and
  ``decode`` / ``encode`` (VAEDecode / VAEEncode). The prompt embedding is diffusers'
  ``StableDiffusion3Pipeline.encode_prompt``, what the trainer uses, so conditioning matches ``pec sample``.

ComfyUI and diffusers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import PECError
from ..pretrained import dtype_option

__all__ = ["EmbeddedClip", "EmbeddedVae", "embedded_folder", "load_embedded", "load_embedded_model"]


def embedded_folder() -> Path:
    """``trainer/toy/pretrained`` beside this package, found without importing ``trainer``: the two packages sit
    side by side in the repository (the node pack's folder in ``custom_nodes``) and in an installed wheel alike,
    while ``trainer`` is not importable inside ComfyUI, which imports only the pack's own folder."""
    folder = Path(__file__).resolve().parents[2] / "trainer" / "toy" / "pretrained"
    if not (folder / "model_index.json").is_file():
        raise PECError(f"the embedded model is missing: {folder} has no model_index.json")
    return folder


def load_embedded_model(folder: Path):
    """A ComfyUI ``ModelPatcher`` holding ComfyUI's SD3 model built from ``folder/transformer``."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import SelfAttention

    config = json.loads((folder / "transformer" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    defaults = json.loads((folder / "pec.json").read_text())
    diffusers_sd = comfy.utils.load_torch_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd = comfy.model_detection.convert_diffusers_mmdit(diffusers_sd, "")
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    blocks, depth = config["num_layers"], unet_config["depth"]
    unet_config["num_blocks"] = blocks  # detection assumes depth = hidden / 64 blocks
    if blocks != depth:
        # The conversion swaps (scale, shift) of the last block's context modulation (diffusers'
        # AdaLayerNormContinuous) at block depth - 1; it belongs to block num_blocks - 1.
        for block in (depth - 1, blocks - 1):
            for end in ("weight", "bias"):
                key = f"joint_blocks.{block}.context_block.adaLN_modulation.1.{end}"
                sd[key] = torch.cat(sd[key].chunk(2)[::-1])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if model_config is None or type(model_config).__name__ != "SD3":
        raise PECError(f"ComfyUI does not recognise {folder / 'transformer'} as an SD3 model")
    model_config.sampling_settings = {"shift": float(defaults["shift"])}
    latent_format = comfy.latent_formats.SD3()
    latent_format.scale_factor = float(vae_config["scaling_factor"])
    latent_format.shift_factor = float(vae_config["shift_factor"])
    model_config.latent_format = latent_format
    model_config.set_inference_dtype(torch.float32, None)

    model = model_config.get_model(sd, "")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    for module in model.diffusion_model.modules():
        if isinstance(module, SelfAttention):  # ComfyUI's MMDiT fixes 64-wide heads; this model has 32
            module.num_heads, module.head_dim = heads, head_dim
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


class EmbeddedClip:
    """ComfyUI's CLIP interface over the pipeline's two text encoders.

    ``tokenize(text)`` keeps the text (the tokenizers run inside ``encode_prompt``);
    ``encode_from_tokens_scheduled`` gives ``[[embeds [1, L, 128], {"pooled_output": [1, 64]}]]``.
    LoRA patches are not supported on these encoders (PEC LoRAs train none): :meth:`add_patches`
    applies nothing and says so, so ComfyUI reports any text-encoder keys of a LoRA as not loaded.
    """

    def __init__(self, pipe, max_sequence_length: int):
        import torch

        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.cond_stage_model = torch.nn.Module()  # no patchable weights (see add_patches)

    def clone(self):
        return self

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return []

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"text": text}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=[tokens["text"]],
                prompt_2=None,
                prompt_3=None,
                device="cpu",
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        if return_dict:
            return {"cond": embeds, "pooled_output": pooled}
        return (embeds, pooled) if return_pooled else embeds

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict=None, show_pbar=True):
        encoded = self.encode_from_tokens(tokens, return_dict=True)
        return [[encoded["cond"], {"pooled_output": encoded["pooled_output"], **(add_dict or {})}]]


class EmbeddedVae:
    """ComfyUI's VAE interface over the pipeline's ``AutoencoderKL``: latents in ComfyUI's VAE space
    (what samplers hand to VAEDecode: ``z / scaling_factor + shift_factor``) ↔ IMAGE ``[B, H, W, 3]``."""

    downscale_ratio = 4  # three encoder levels: 64 px images, 16x16 latents

    def __init__(self, vae):
        self.vae = vae

    def decode(self, samples):
        import torch

        with torch.no_grad():
            pixels = self.vae.decode(samples.float().cpu(), return_dict=False)[0]
        return (pixels / 2 + 0.5).clamp(0, 1).movedim(1, -1)

    def encode(self, pixels):
        import torch

        with torch.no_grad():
            return self.vae.encode(pixels[..., :3].movedim(-1, 1).float().cpu() * 2 - 1).latent_dist.mean


def load_embedded():
    """(MODEL, CLIP, VAE) of the embedded model."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    folder = embedded_folder()
    defaults = json.loads((folder / "pec.json").read_text())
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder), text_encoder_3=None, tokenizer_3=None, **dtype_option(torch.float32)
    )
    clip = EmbeddedClip(pipe, int(defaults["max_sequence_length"]))
    return load_embedded_model(folder), clip, EmbeddedVae(pipe.vae)
