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

import json
from collections import Counter
from pathlib import Path

import torch

from .world import COLOURS, SHAPES, SIZE_WORDS

#: where the shipped weights live (a ``StableDiffusion3Pipeline`` directory).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "pretrained"
PEC_CONFIG_NAME = "pec.json"

RESOLUTION = 64

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

#: every word the grammar writes or :func:`trainer.toy.world.parse_prompt` accepts (synonyms,
#: plurals, fillers), each of which becomes a single token.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(
            list(SHAPES)
            + [s + ("es" if s.endswith("ss") else "s") for s in SHAPES]
            + ["plus", "disc", "disk"]
            + list(COLOURS)
            + ["violet", "turquoise"]
            + list(SIZE_WORDS)
            + ["little", "tiny", "big", "huge"]
            + [
                "a",
                "an",
                "the",
                "on",
                "at",
                "in",
                "to",
                "of",
                "and",
                "with",
                "next",
                "beside",
                "left",
                "right",
                "top",
                "bottom",
                "centre",
                "center",
                "middle",
                "centred",
                "centered",
                "above",
                "over",
                "below",
                "under",
                "beneath",
                "image",
                "picture",
                "photo",
                "drawing",
                "render",
                "colour",
                "color",
                "shape",
            ]
        )
    )
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
#: tokens per caption, BOS and EOS included (the longest grammar caption takes 12).
MODEL_MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP): printable Latin-1
    bytes map to themselves, the others to code points from 256 upwards."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word of ``words`` one symbol (ends marked ``</w>``).

    Plain BPE learning on the word list (each word counted once): repeatedly merge the most
    frequent adjacent pair (ties: the lexicographically first), until no word has two symbols.
    Encoding with these merges in rank order reproduces the learned segmentation, so each word
    becomes exactly one token.
    """
    seqs = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]
    merges = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        top = max(counts.values())
        best = min(p for p, c in counts.items() if c == top)
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def tokenizer_files(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE ``vocab.json`` dict and ``merges.txt`` lines for ``words``.

    Layout as OpenAI's CLIP vocabulary: the 256 byte characters, the same with ``</w>``, one
    entry per merge, then BOS and EOS (EOS doubles as pad and unknown token).
    """
    chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(words)
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(directory: str | Path, words=VOCABULARY) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(words)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizer(words=VOCABULARY):
    """A ``CLIPTokenizer`` for the world's vocabulary (model_max_length :data:`MODEL_MAX_LENGTH`)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MODEL_MAX_LENGTH)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Build / save / load
# ----------------------------------------------------------------------------------------------


def build_pipeline(
    seed: int = 0,
    transformer_config: dict | None = None,
    vae_config: dict | None = None,
    text_encoder_config: dict | None = None,
    shift: float | None = None,
):
    """A randomly initialised tiny ``StableDiffusion3Pipeline`` (float32, CPU, eval mode).

    The optional dicts override entries of the module configs; ``seed`` fixes every init.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_cfg = CLIPTextConfig(**{**TEXT_ENCODER_CONFIG, **(text_encoder_config or {})})
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    vae = AutoencoderKL(**{**VAE_CONFIG, **(vae_config or {})})
    transformer = SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **(transformer_config or {})})
    scheduler = FlowMatchEulerDiscreteScheduler(**{**SCHEDULER_CONFIG, **({} if shift is None else {"shift": shift})})
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()
    return pipe


def save_pipeline(pipe, directory: str | Path, defaults: dict | None = None) -> Path:
    """Save ``pipe`` with ``save_pretrained`` (safetensors) plus ``pec.json`` and the tokenizers'
    ``vocab.json`` / ``merges.txt``. Returns the directory."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(directory / sub)
    pec = {**PEC_DEFAULTS, **(defaults or {})}
    (directory / PEC_CONFIG_NAME).write_text(json.dumps(pec, indent=2, sort_keys=True) + "\n")
    return directory


def load_pipeline(directory: str | Path = DEFAULT_MODEL_DIR, dtype: torch.dtype = torch.float32):
    """Load a saved toy pipeline offline (``StableDiffusion3Pipeline.from_pretrained``)."""
    from diffusers import StableDiffusion3Pipeline

    # T5 is absent: SD3 lists it as a required component, so it is passed as None explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(directory), torch_dtype=dtype, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_defaults(directory: str | Path = DEFAULT_MODEL_DIR) -> dict:
    """``pec.json`` of a model directory merged over :data:`PEC_DEFAULTS`."""
    from ..backends.base import read_defaults as read_model_defaults

    return read_model_defaults(str(directory), PEC_DEFAULTS)


def safetensors_bytes(directory: str | Path) -> int:
    """Total size of the ``*.safetensors`` files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))
