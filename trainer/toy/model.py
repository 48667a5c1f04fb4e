"""The embedded default model: a tiny SD3-architecture text-to-image flow model for the shapes world.

Everything is a stock diffusers / transformers class built from the explicit configs below and
assembled as a real :class:`diffusers.StableDiffusion3Pipeline`, so the trainer drives it through
exactly the code path of a real SD3 checkpoint (T5 is absent: ``text_encoder_3 = None``, which
the pipeline replaces by zero embeddings; ``max_sequence_length = 0`` makes that zero tokens).

Components (64x64 RGB images, 16x16x16 latents, 8x8 = 64 image tokens):

* tokenizer / tokenizer_2: a CLIP BPE tokenizer built offline for the world's vocabulary
  (:func:`build_tokenizer`): every grammar word, synonym and filler word the caption parser
  accepts is one token; any other text falls back to byte-level characters. Colour and shape
  words are separate tokens, so an unseen (colour, shape) pair is a new combination of known
  tokens -- what the model has to generalise to.
* text_encoder / text_encoder_2: two tiny ``CLIPTextModelWithProjection`` (causal, as CLIP).
  SD3 takes the penultimate hidden states of both, concatenated along the feature axis and
  zero-padded to ``joint_attention_dim``, as the token sequence, and the concatenated projected
  EOS embeddings as the pooled vector.
* vae: a tiny ``AutoencoderKL`` with a 4x downsample (objects are down to ~7 px wide at 64 px)
  to 16 latent channels, SD3-style (no quant convs, no mid-block attention); ``scaling_factor``
  and ``shift_factor`` are set from data statistics so that scaled latents are ~unit variance.
* transformer: a tiny ``SD3Transformer2DModel`` (MMDiT, patch 2).
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with the shift of :data:`PEC_DEFAULTS`.

``pec.json`` beside ``model_index.json`` holds the sampling defaults the trainer reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_pec.pretrained import dtype_option

from ..backends import EMBEDDED_MODEL
from ..backends.random_init import PipelineSpec
from ..world.vocabulary import MODEL_MAX_LENGTH, tokenizer_files

#: where the shipped weights live (a ``StableDiffusion3Pipeline`` directory).
DEFAULT_MODEL_DIR = Path(EMBEDDED_MODEL)

RESOLUTION = 64

_VOCAB_SIZE = len(tokenizer_files()[0])

#: both CLIP text encoders (SD3 needs two; they differ only in their random init).
TEXT_ENCODER_CONFIG = dict(
    vocab_size=_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=256,
    projection_dim=32,
    num_hidden_layers=3,  # SD3 reads the penultimate layer; the last one feeds the pooled vector
    num_attention_heads=2,
    max_position_embeddings=MODEL_MAX_LENGTH,
    hidden_act="quick_gelu",
    bos_token_id=_VOCAB_SIZE - 2,
    eos_token_id=_VOCAB_SIZE - 1,
    pad_token_id=_VOCAB_SIZE - 1,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # two downsamples: 64x64 -> 16x16; narrow at full resolution
    layers_per_block=1,
    latent_channels=16,  # as SD3; 4 channels blurred ring holes and star points away
    norm_num_groups=8,
    sample_size=RESOLUTION,
    scaling_factor=1.0,  # set from data by the pre-training (latents ~ unit variance)
    shift_factor=0.0,
    force_upcast=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)

_CLIP_WIDTH = 2 * TEXT_ENCODER_CONFIG["hidden_size"]

TRANSFORMER_CONFIG = dict(
    sample_size=RESOLUTION // 4,
    patch_size=2,
    in_channels=VAE_CONFIG["latent_channels"],
    out_channels=VAE_CONFIG["latent_channels"],
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=_CLIP_WIDTH,  # both CLIP widths side by side, no T5 padding needed
    caption_projection_dim=128,  # = heads x head dim
    pooled_projection_dim=2 * TEXT_ENCODER_CONFIG["projection_dim"],
    pos_embed_max_size=RESOLUTION // 4 // 2,
)

#: sampling defaults written to ``pec.json`` (the trainer's backend reads them).
PEC_DEFAULTS = dict(
    resolution=RESOLUTION,
    num_steps=10,
    eval_num_steps=10,
    guidance_scale=3.0,
    shift=1.0,
    max_sequence_length=0,  # no T5 tokens at all
    noise_level=0.7,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=PEC_DEFAULTS["shift"])


#: the embedded model's architecture, built by :func:`trainer.backends.random_init.build_pipeline`
EMBEDDED_SPEC = PipelineSpec(
    family="sd3",
    transformer=TRANSFORMER_CONFIG,
    vae=VAE_CONFIG,
    clip=TEXT_ENCODER_CONFIG,
    clip_2=TEXT_ENCODER_CONFIG,
    t5=None,
    clip_max_length=MODEL_MAX_LENGTH,
    defaults=PEC_DEFAULTS,
    scheduler=SCHEDULER_CONFIG,
)


def load_pipeline(directory: str | Path = DEFAULT_MODEL_DIR, dtype: torch.dtype = torch.float32):
    """Load a saved toy pipeline offline (``StableDiffusion3Pipeline.from_pretrained``)."""
    from diffusers import StableDiffusion3Pipeline

    # T5 is absent: SD3 lists it as a required component, so it is passed as None explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(directory), text_encoder_3=None, tokenizer_3=None, local_files_only=True, **dtype_option(dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def safetensors_bytes(directory: str | Path) -> int:
    """Total size of the ``*.safetensors`` files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))
