"""Randomly initialised pipelines built from configs, for tests, benchmarks and the dry-run plan (no download).

Every component is a stock diffusers / transformers class; the tokenizers are built offline (a CLIP
BPE tokenizer over the embedded world's words, :func:`trainer.world.vocabulary.tokenizer_files`, and a T5
Unigram tokenizer over the same words plus single letters). :data:`SPECS` holds the real sizes of
SD3.5-Medium and FLUX.1-dev (the published configs) and tiny ones whose text widths match the tiny
transformers of the tests; :data:`LLM_SPECS` the same for the families with LLM text encoders (Z-Image,
Qwen-Image, FLUX.2-dev and -klein 4B/9B), whose modules :func:`llm_transformer`, :func:`llm_vae` and
:func:`llm_text_encoder` build (on the meta device under ``init_empty_weights``, for parameter counts). Saved with :func:`save_pipeline`, a pipeline loads back through
:func:`trainer.backends.load_backend` like a downloaded one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..world.vocabulary import VOCABULARY, tokenizer_files, write_tokenizer_files
from .base import DEFAULTS_FILE


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Configs of one pipeline. ``clip`` is CLIP-L (FLUX: the pooled encoder), ``clip_2`` SD3's CLIP-G."""

    family: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    clip_2: dict[str, Any] | None
    t5: dict[str, Any] | None
    clip_max_length: int = 77
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduler: dict[str, Any] | None = None  # FlowMatchEulerDiscreteScheduler; None = the family's

    def with_overrides(self, **parts: dict[str, Any]) -> PipelineSpec:
        """This spec with entries of its config dicts replaced, e.g. ``transformer={"num_layers": 2}``."""
        return dataclasses.replace(self, **{k: {**getattr(self, k), **v} for k, v in parts.items()})


def _vae(blocks: tuple[int, ...], layers: int, groups: int, scaling: float, shift: float) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=blocks,
        layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        norm_num_groups=groups,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip(hidden: int, layers: int, heads: int, act: str = "quick_gelu", vocab: int = 49408) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden,
        hidden_act=act,
    )


def _t5(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int, vocab: int = 32128) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_heads=heads,
        num_layers=layers,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )


_SD3_VAE = _vae((128, 256, 512, 512), 2, 32, scaling=1.5305, shift=0.0609)
_FLUX_VAE = _vae((128, 256, 512, 512), 2, 32, scaling=0.3611, shift=0.1159)
_T5_XXL = _t5(4096, 10240, 64, 64, 24)
# What both tiny pipelines share: a 2x down-sampling 16-channel VAE, a one-layer T5, short texts.
_TINY = dict(
    vae=_vae((8, 16), 1, 4, scaling=1.0, shift=0.0),
    t5=_t5(32, 64, 8, 2, 1, vocab=0),
    clip_max_length=16,
    defaults=dict(resolution=32, num_steps=4, eval_num_steps=4, max_sequence_length=8),
)

#: name -> spec; real sizes as published, tiny ones for CPU tests (32 px images, 16x16 latents).
SPECS: dict[str, PipelineSpec] = {
    "sd3.5-medium": PipelineSpec(
        family="sd3",
        transformer=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        vae=_SD3_VAE,
        clip=_clip(768, 12, 12),
        clip_2=_clip(1280, 32, 20, act="gelu"),
        t5=_T5_XXL,
    ),
    "flux.1-dev": PipelineSpec(
        family="flux",
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=_FLUX_VAE,
        clip=_clip(768, 12, 12),
        clip_2=None,
        t5=_T5_XXL,
    ),
    "tiny-sd3.5": PipelineSpec(
        family="sd3",
        transformer=dict(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=8,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
        clip=_clip(16, 2, 2, vocab=0),
        clip_2=_clip(16, 2, 2, vocab=0),
        **_TINY,
    ),
    "tiny-flux": PipelineSpec(
        family="flux",
        transformer=dict(
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
        ),
        clip=_clip(32, 2, 2, vocab=0),
        clip_2=None,
        **_TINY,
    ),
}


# ----------------------------------------------------------------------------- tokenizers


def clip_tokenizer(max_length: int):
    """A CLIP BPE tokenizer (one token per world word, bytes otherwise); BOS and EOS are its last ids."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(VOCABULARY)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5 (SentencePiece-style Unigram) tokenizer: ids 0-2 are pad, EOS, unknown; then words, letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in VOCABULARY] + [(c, -5.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


# ----------------------------------------------------------------------------- build / save


def _text_encoder(cls, config_cls, config: dict[str, Any], tokenizer, device, dtype):
    """A text encoder whose vocabulary covers ``tokenizer`` (``vocab_size`` 0 = exactly its size)."""
    size = len(tokenizer)
    config = dict(config, vocab_size=config["vocab_size"] or size)
    if config_cls.__name__ == "CLIPTextConfig":
        # CLIP pools at the EOS token: give the config the tokenizer's ids.
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
        config.update(
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, max_position_embeddings=tokenizer.model_max_length
        )
    return cls(config_cls(**config)).to(device, dtype).eval()


_FAMILY_SCHEDULERS: dict[str, dict[str, Any]] = {
    "sd3": dict(shift=3.0),
    "flux": dict(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    ),
}


def build_pipeline(spec: PipelineSpec | str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised pipeline of ``spec`` (a :data:`SPECS` name or a spec) in eval mode; VAE in float32.

    The one builder of every pipeline the project makes: the embedded model's recipe
    (``trainer.toy.model.EMBEDDED_SPEC``), the tests' tiny models and real-size benchmarks. With the global
    generator seeded by ``seed``, the text encoders are initialised first, then the VAE, then the transformer.
    Each module is initialised on ``device`` in float32, then cast, so a real-size model never holds a float32
    copy of more than one module.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    spec = SPECS[spec] if isinstance(spec, str) else spec
    sd3 = spec.family == "sd3"
    torch.manual_seed(seed)
    with torch.device(device):
        clip_tok, t5_tok = clip_tokenizer(spec.clip_max_length), t5_tokenizer()
        clip_cls = CLIPTextModelWithProjection if sd3 else CLIPTextModel
        text_encoder = _text_encoder(clip_cls, CLIPTextConfig, spec.clip, clip_tok, device, dtype)
        clip_2 = _text_encoder(clip_cls, CLIPTextConfig, spec.clip_2, clip_tok, device, dtype) if spec.clip_2 else None
        t5 = _text_encoder(T5EncoderModel, T5Config, spec.t5, t5_tok, device, dtype) if spec.t5 else None
        vae = diffusers.AutoencoderKL(**spec.vae).eval()
        transformer_cls = diffusers.SD3Transformer2DModel if sd3 else diffusers.FluxTransformer2DModel
        transformer = transformer_cls(**spec.transformer).to(dtype).eval()
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**(spec.scheduler or _FAMILY_SCHEDULERS[spec.family]))
        parts: dict[str, Any] = dict(transformer=transformer, vae=vae, tokenizer=clip_tok, scheduler=scheduler)
        if sd3:
            parts.update(
                text_encoder=text_encoder,
                text_encoder_2=clip_2,
                tokenizer_2=clip_tokenizer(spec.clip_max_length),
                text_encoder_3=t5,
                tokenizer_3=t5_tok if t5 is not None else None,
            )
            return diffusers.StableDiffusion3Pipeline(**parts)
        parts.update(text_encoder=text_encoder, text_encoder_2=t5, tokenizer_2=t5_tok)
        return diffusers.FluxPipeline(**parts)


def save_pipeline(pipe, directory: str | Path, defaults: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` (safetensors) plus the CLIP tokenizers' vocab.json / merges.txt and ``pec.json``."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if type(getattr(pipe, name, None)).__name__.startswith("CLIPTokenizer"):
            write_tokenizer_files(directory / name, VOCABULARY)
    if defaults:
        (directory / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    return directory


# ----------------------------------------------------------------------------- Z-Image and Qwen-Image


@dataclasses.dataclass(frozen=True)
class LLMPipelineSpec:
    """Configs of a pipeline whose text encoder is an LLM: Z-Image and FLUX.2-klein (Qwen3), Qwen-Image
    (Qwen2.5-VL) or FLUX.2-dev (Mistral-3; the tiny ones tokenize with :func:`qwen_tokenizer`).

    ``text_encoder`` holds the transformers config kwargs (``Qwen3Config``, or ``Qwen2_5_VLConfig`` /
    ``Mistral3Config`` with ``text_config`` and ``vision_config``), ``scheduler`` the
    ``FlowMatchEulerDiscreteScheduler`` config.
    """

    family: str  # "zimage" | "qwenimage" | "flux2" | "flux2-klein"
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


def _qwen_vae(base_dim: int, dim_mult: tuple[int, ...], blocks: int) -> dict[str, Any]:
    """The Qwen-Image VAE (one-frame video VAE, 16 channels; latents_mean/std are its defaults)."""
    return dict(
        base_dim=base_dim,
        z_dim=16,
        dim_mult=list(dim_mult),
        num_res_blocks=blocks,
        temperal_downsample=[False, True, True][: len(dim_mult) - 1],
    )


def _qwen3(hidden: int, ff: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int = 151936, tie=True):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        tie_word_embeddings=tie,
    )


# Qwen3-4B (Z-Image, FLUX.2-klein-4B) and Qwen3-8B (klein-9B), as their model cards state them (36 layers, GQA 32
# query / 8 key-value heads of 128; 4B: width 2560, FFN 9728, tied embeddings, 4.0 B parameters; 8B: width 4096,
# FFN 12288, untied, 8.2 B).
_QWEN3_4B = _qwen3(2560, 9728, 36, 32, 8, 128)
_QWEN3_8B = _qwen3(4096, 12288, 36, 32, 8, 128, tie=False)


# Published scheduler configs: Z-Image-Turbo shifts statically by 3; Qwen-Image shifts dynamically and
# stretches the schedule to end at 0.02.
_ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
_QWENIMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
_FLUX2_SCHEDULER = dict(  # FLUX.2's config; its pipelines pass their own empirical mu
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
# ComfyUI's FLUX.2 takes the 256-channel timestep embedding and 4-axis RoPE as FLUX.2 has them.
_TINY_FLUX2 = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # three stacked text-encoder layers of 16
    axes_dims_rope=(4, 4, 4, 4),
)
_TINY_FLUX2_VAE = dict(_vae((8, 16), 1, 4, scaling=1.0, shift=0.0), latent_channels=32)
_FLUX2_VAE = dict(_vae((128, 256, 512, 512), 2, 32, scaling=1.0, shift=0.0), latent_channels=32)


def _flux2_transformer(layers: int, single_layers: int, heads: int, text_width: int, guidance: bool) -> dict[str, Any]:
    """A FLUX.2 transformer config: 128-wide heads, MLP ratio 3, the text input three stacked encoder layers."""
    return dict(
        num_layers=layers,
        num_single_layers=single_layers,
        num_attention_heads=heads,
        attention_head_dim=128,
        joint_attention_dim=3 * text_width,
        guidance_embeds=guidance,
    )


_TINY_LLM_DEFAULTS = dict(resolution=32, num_steps=4, eval_num_steps=4, max_sequence_length=48)

#: name -> spec; the published sizes, and tiny ones for CPU tests (32 px images) whose shapes ComfyUI's
#: loaders accept (Z-Image: dim >= 1024 for ComfyUI's timestep MLP widths, FFN width int(8/3·dim) a
#: multiple of 256: 1056 is the smallest such dim).
#: Sources of the published sizes: diffusers' transformer defaults (ZImageTransformer2DModel, QwenImageTransformer2DModel
#: and Flux2Transformer2DModel are Z-Image-Turbo, Qwen-Image and FLUX.2-dev) and its conversion script
#: scripts/convert_flux2_to_diffusers.py (dev, klein-4b and klein-9b configs); the text encoders' model cards
#: (Qwen3-4B/8B, Qwen2.5-VL-7B-Instruct, Mistral-Small-3.1/3.2-24B). tests/test_plan_new_families.py checks the
#: parameter counts against the published sizes (6 B, 20 B, 32 B, 4 B, 9 B).
LLM_SPECS: dict[str, LLMPipelineSpec] = {
    "z-image-turbo": LLMPipelineSpec(
        family="zimage",
        transformer=dict(
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            cap_feat_dim=2560,
            axes_dims=[32, 48, 48],
            axes_lens=[1536, 512, 512],  # the hub config's and ComfyUI's (diffusers' default is 1024 frames)
        ),
        vae=_FLUX_VAE,  # the FLUX.1 VAE
        text_encoder=_QWEN3_4B,
        scheduler=_ZIMAGE_SCHEDULER,
    ),
    "qwen-image": LLMPipelineSpec(
        family="qwenimage",
        transformer=dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=_qwen_vae(96, (1, 2, 4, 4), 2),
        text_encoder=dict(
            text_config=dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
            ),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        ),
        scheduler=_QWENIMAGE_SCHEDULER,
    ),
    "tiny-zimage": LLMPipelineSpec(
        family="zimage",
        transformer=dict(
            dim=1056,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=11,
            n_kv_heads=11,
            cap_feat_dim=32,
            axes_dims=[32, 32, 32],
            axes_lens=[64, 32, 32],
        ),
        vae=_TINY["vae"],
        text_encoder=_qwen3(32, 64, 2, 2, 1, 16, vocab=0),
        scheduler=_ZIMAGE_SCHEDULER,
        defaults=_TINY_LLM_DEFAULTS,
    ),
    "flux.2-dev": LLMPipelineSpec(
        family="flux2",
        transformer=_flux2_transformer(8, 48, 48, 5120, guidance=True),  # diffusers' Flux2Transformer2DModel defaults
        vae=_FLUX2_VAE,
        text_encoder=dict(  # Mistral-Small-3.1/3.2-24B (one architecture; diffusers' converter loads 3.2)
            tie_word_embeddings=False,  # its own LM head: 24.0 B parameters with it
            text_config=dict(
                model_type="mistral",
                vocab_size=131072,
                hidden_size=5120,
                intermediate_size=32768,
                num_hidden_layers=40,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
            ),
            vision_config=dict(  # Pixtral: 0.4 B of the 24 B
                model_type="pixtral",
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                head_dim=64,
                patch_size=14,
                image_size=1540,
            ),
        ),
        scheduler=_FLUX2_SCHEDULER,
    ),
    "flux.2-klein-4b": LLMPipelineSpec(
        family="flux2-klein",
        transformer=_flux2_transformer(5, 20, 24, 2560, guidance=False),
        vae=_FLUX2_VAE,
        text_encoder=_QWEN3_4B,
        scheduler=_FLUX2_SCHEDULER,
    ),
    "flux.2-klein-9b": LLMPipelineSpec(
        family="flux2-klein",
        transformer=_flux2_transformer(8, 24, 32, 4096, guidance=False),
        vae=_FLUX2_VAE,
        text_encoder=_QWEN3_8B,
        scheduler=_FLUX2_SCHEDULER,
    ),
    "tiny-flux2-dev": LLMPipelineSpec(
        family="flux2",
        transformer=dict(_TINY_FLUX2, guidance_embeds=True),
        vae=_TINY_FLUX2_VAE,
        text_encoder=dict(  # the pipeline reads hidden states 10, 20 and 30: 30 layers at least
            text_config=dict(
                model_type="mistral",
                vocab_size=0,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=30,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
            ),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=8,
                patch_size=16,
                image_size=32,
            ),
        ),
        scheduler=_FLUX2_SCHEDULER,
        defaults=dict(_TINY_LLM_DEFAULTS, max_sequence_length=128),  # its system message alone is ~90 tokens here
    ),
    "tiny-flux2-klein": LLMPipelineSpec(
        family="flux2-klein",
        transformer=dict(_TINY_FLUX2, guidance_embeds=False),
        vae=_TINY_FLUX2_VAE,
        # the pipeline reads hidden states 9, 18 and 27: 27 layers at least
        text_encoder=_qwen3(16, 32, 27, 2, 1, 8, vocab=0),
        scheduler=_FLUX2_SCHEDULER,
        defaults=_TINY_LLM_DEFAULTS,
    ),
    "tiny-qwenimage": LLMPipelineSpec(
        family="qwenimage",
        transformer=dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=_qwen_vae(8, (1, 2), 1),
        text_encoder=dict(
            text_config=dict(
                vocab_size=0,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e6),
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                fullatt_block_indexes=[0],
            ),
        ),
        scheduler=_QWENIMAGE_SCHEDULER,
        defaults=_TINY_LLM_DEFAULTS,
    ),
}

_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# FLUX.2-dev's messages carry their text as [{"type": "text", "text": ...}] content lists.
_MISTRAL_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/{{ m['role'] }}]"
    "{% endfor %}"
)


def qwen_tokenizer(vocab_size: int = 512):
    """A Qwen2 byte-level BPE tokenizer trained on the world's words, with the ChatML special tokens and
    chat template the Z-Image / Qwen-Image pipelines use; ``<|endoftext|>`` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Qwen-Image wraps prompts in a fixed system prompt and drops its first 34 tokens: its words are in the
    # vocabulary so that, as with the real tokenizer, the template is short and the prompt survives.
    template = "system user assistant Describe the image by detailing the color, shape, size, texture, quantity, "
    template += "text, spatial relationships of the objects and background:"
    tok.train_from_iterator([" ".join(VOCABULARY), template], trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


#: family -> diffusers pipeline, transformer and VAE classes, transformers text-encoder class.
LLM_CLASSES: dict[str, tuple[str, str, str, str]] = {
    "zimage": ("ZImagePipeline", "ZImageTransformer2DModel", "AutoencoderKL", "Qwen3Model"),
    "qwenimage": (
        "QwenImagePipeline",
        "QwenImageTransformer2DModel",
        "AutoencoderKLQwenImage",
        "Qwen2_5_VLForConditionalGeneration",
    ),
    "flux2": ("Flux2Pipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2", "Mistral3ForConditionalGeneration"),
    "flux2-klein": ("Flux2KleinPipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2", "Qwen3ForCausalLM"),
}


def llm_transformer(spec: LLMPipelineSpec):
    """The spec's transformer, randomly initialised (under ``accelerate.init_empty_weights``: on the meta device)."""
    import diffusers

    return getattr(diffusers, LLM_CLASSES[spec.family][1])(**spec.transformer)


def llm_vae(spec: LLMPipelineSpec):
    """The spec's VAE, as :func:`llm_transformer` (FLUX.2's VAE normalises with batch-norm statistics instead of a
    scaling and shift)."""
    import diffusers

    config = spec.vae
    if spec.family.startswith("flux2"):
        config = {k: v for k, v in config.items() if k not in ("scaling_factor", "shift_factor")}
    return getattr(diffusers, LLM_CLASSES[spec.family][2])(**config)


def llm_text_encoder(spec: LLMPipelineSpec, vocab_size: int | None = None):
    """The spec's text encoder, as :func:`llm_transformer`; ``vocab_size`` replaces a spec's 0 (= the tokenizer's)."""
    import transformers

    cls = getattr(transformers, LLM_CLASSES[spec.family][3])
    if spec.family in ("zimage", "flux2-klein"):  # Qwen3
        return cls(
            transformers.Qwen3Config(
                **dict(spec.text_encoder, vocab_size=spec.text_encoder["vocab_size"] or vocab_size)
            )
        )
    text = dict(spec.text_encoder["text_config"])
    text["vocab_size"] = text["vocab_size"] or vocab_size
    # FLUX.2-dev: Mistral-3 with a Pixtral vision tower; Qwen-Image: Qwen2.5-VL (both: text only is used)
    config_cls = transformers.Mistral3Config if spec.family == "flux2" else transformers.Qwen2_5_VLConfig
    return cls(config_cls(**dict(spec.text_encoder, text_config=text)))


def build_llm_pipeline(spec: LLMPipelineSpec | str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised ``ZImagePipeline`` / ``QwenImagePipeline`` / ``Flux2Pipeline`` / ``Flux2KleinPipeline``
    of ``spec`` (an :data:`LLM_SPECS` name or a spec); VAE in float32. Saved with :func:`save_pipeline`, it loads
    through ``load_backend``."""
    import diffusers
    import transformers

    spec = LLM_SPECS[spec] if isinstance(spec, str) else spec
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    with torch.device(device):
        text_encoder = llm_text_encoder(spec, len(tokenizer))
        transformer = llm_transformer(spec)
        vae = llm_vae(spec)
    if spec.family == "flux2":  # Mistral-3's Pixtral processor around the tokenizer
        tokenizer = transformers.PixtralProcessor(
            image_processor=transformers.PixtralImageProcessor(),
            tokenizer=tokenizer,
            patch_size=spec.text_encoder["vision_config"]["patch_size"],
            chat_template=_MISTRAL_CHAT_TEMPLATE,
        )
    if spec.family.startswith("flux2"):  # non-trivial latent statistics, so that tests see the normalisation
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return getattr(diffusers, LLM_CLASSES[spec.family][0])(
        transformer=transformer.to(dtype).eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )
