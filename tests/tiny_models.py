"""Tiny diffusers transformers with the real SD3 / SD3.5 / FLUX block structure, for CPU tests.

Deterministic: each builder seeds torch itself. Sizes are chosen so that ComfyUI's model detection
also accepts the state dicts (see tests/test_lora_format.py): for MMDiT it infers depth = hidden / 64
and builds hidden/64 blocks with 64-wide heads, so the SD3 models have 2 blocks of 2 heads x 64
and 16 latent channels (ComfyUI's SD3 config requires 16).

Also the checks that a LoRA file loads in diffusers and in ComfyUI, shared by the LoRA-format tests
and the backend tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch

# PEFT target names (suffix-matched): every attention projection, incl. the SD3.5 attn2 blocks.
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# FLUX adds the MLPs and the single-stream blocks' fused projections (Flow-GRPO's FLUX recipe + ff).
FLUX_TARGETS = ATTENTION_TARGETS + [
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]

SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=128,
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=8,
)
SD35M_CONFIG = dict(SD3_CONFIG, qk_norm="rms_norm", dual_attention_layers=(0,))
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _build(cls, config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(**config).eval()


def tiny_sd3_transformer(seed: int = 0):
    """SD3-Medium-shaped ``SD3Transformer2DModel``: 2 joint blocks, hidden 128, no qk-norm, no attn2."""
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, SD3_CONFIG, seed)


def tiny_sd35m_transformer(seed: int = 0):
    """SD3.5-Medium-shaped ``SD3Transformer2DModel``: as SD3 plus RMS qk-norm and attn2 in block 0."""
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, SD35M_CONFIG, seed)


def tiny_flux_transformer(seed: int = 0):
    """FLUX.1-dev-shaped ``FluxTransformer2DModel``: 1 double + 1 single block, hidden 32, guidance."""
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, FLUX_CONFIG, seed)


def add_random_lora(model, r: int = 4, alpha: float = 8, targets=ATTENTION_TARGETS, seed: int = 1, **config):
    """Add a PEFT LoRA adapter ("default") with random A and B (B != 0, so it changes outputs).

    ``config`` goes to ``LoraConfig`` (e.g. ``rank_pattern``, ``use_rslora``). Returns the model.
    """
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    return randomize_lora(model, seed)


def randomize_lora(model, seed: int = 1):
    """Fill every lora_A / lora_B weight of ``model`` with N(0, 0.2²) noise (PEFT starts B at 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.normal_(0.0, 0.2)
    return model


def sd3_inputs(batch: int = 1, seed: int = 2) -> dict:
    """Fixed SD3 transformer inputs: latents [B, 16, 8, 8], text [B, 5, 32], pooled [B, 32], t [B]."""
    g = torch.Generator().manual_seed(seed)
    cfg = SD3_CONFIG
    size = cfg["sample_size"]
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 500.0),
    )


def flux_inputs(batch: int = 1, seed: int = 2) -> dict:
    """Fixed FLUX inputs: packed latents [B, 16, 64] (a 4x4 token grid), text [B, 5, 32], ids, guidance."""
    g = torch.Generator().manual_seed(seed)
    cfg = FLUX_CONFIG
    side, text_len = 4, 5
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(batch, side * side, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        guidance=torch.full((batch,), 3.5),
    )


# ----------------------------------------------------------------------------- loading checks (diffusers, ComfyUI)


@contextlib.contextmanager
def captured_log(name: str, level: int = logging.WARNING):
    """Collect the messages of logger ``name`` (diffusers' loggers do not propagate to the root)."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Collect(level)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def key_warnings(messages: list[str]) -> list[str]:
    """diffusers' warnings about LoRA keys it could not place (not the "no text-encoder keys" notice)."""
    return [m for m in messages if "missing keys" in m or "unexpected keys" in m]


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


FAMILIES = {
    # name: (builder, inputs, pipeline class name, LoRA targets)
    "sd3.5-medium": (tiny_sd35m_transformer, sd3_inputs, "StableDiffusion3Pipeline", ATTENTION_TARGETS),
    "flux": (tiny_flux_transformer, flux_inputs, "FluxPipeline", FLUX_TARGETS),
}


def fresh_pipeline(family: str, transformer=None):
    """A pipeline around a fresh copy of the base transformer; no VAE / text encoders needed here."""
    import diffusers

    build, _, pipeline_name, _ = FAMILIES[family]
    components = dict(
        transformer=transformer or build(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None
    )
    names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if pipeline_name == "StableDiffusion3Pipeline":
        names += ["text_encoder_3", "tokenizer_3"]
    return getattr(diffusers, pipeline_name)(**components, **dict.fromkeys(names))


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (out - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max abs error {err:.3g} vs output scale {ref.abs().max():.3g}"


def import_comfy():
    """ComfyUI's model loading and LoRA modules, imported from $COMFYUI_PATH on the CPU."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA here
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd

    return comfy


def comfy_model(comfy, family: str, diffusers_state: dict):
    """A ComfyUI ModelPatcher around a tiny diffusers-format state dict."""
    if family != "flux":
        return comfy.sd.load_diffusion_model_state_dict(dict(diffusers_state), model_options={"dtype": torch.float32})
    # ComfyUI's FLUX detection hard-codes the full-size widths (hidden 3072, 24 heads, T5 4096): the
    # loader flow of load_diffusion_model_state_dict with the tiny widths put back.
    state = comfy.model_detection.convert_diffusers_mmdit(dict(diffusers_state), "")
    config = comfy.model_detection.model_config_from_unet(state, "")
    cfg = FLUX_CONFIG
    config.unet_config.update(
        hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        num_heads=cfg["num_attention_heads"],
        context_in_dim=cfg["joint_attention_dim"],
        axes_dim=list(cfg["axes_dims_rope"]),
    )
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state, "")
    model.load_model_weights(state, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_forward(patcher, family: str, inputs: dict) -> torch.Tensor:
    """ComfyUI's inner diffusion model on the diffusers inputs, output in the diffusers layout."""
    net = patcher.model.diffusion_model
    with torch.no_grad():
        if family != "flux":
            return net(
                inputs["hidden_states"],
                inputs["timestep"],
                context=inputs["encoder_hidden_states"],
                y=inputs["pooled_projections"],
            )
        # diffusers packs 2x2 latent patches into the channels: [B, 16 tokens, 64] <-> [B, 16, 8, 8]
        x = inputs["hidden_states"].reshape(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)
        out = net(
            x,
            inputs["timestep"],
            context=inputs["encoder_hidden_states"],
            y=inputs["pooled_projections"],
            guidance=inputs["guidance"],
        )
        return out.reshape(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)
