"""Tiny reward models and perceptual encoders, randomly initialised from configs and saved in the
on-disk layout of the published weights (for CPU tests of the real loading code; no download).

- CLIP / PickScore: a transformers ``CLIPModel`` directory with a CLIP BPE tokenizer.
- DINOv2: a transformers ``Dinov2Model`` directory.
- HPSv2.1: ``HPS_v2.1_compressed.pt`` = ``{"state_dict": <open_clip CLIP state dict>}`` plus open_clip's
  ``open_clip_config.json`` naming the tiny architecture.
- Aesthetic v2.5: a transformers ``SiglipVisionModel`` directory plus ``aesthetic_predictor_v2_5.pth``
  (``scoring_head.{0,2,4,6,8}``).
- ImageReward: ``ImageReward.pt`` in the original ``image-reward`` key layout (timm-style BLIP ViT,
  BLIP "med" BERT with cross-attention, ``mlp.layers``), ``med_config.json`` and a BERT ``vocab.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "cat", "dog", "photo", "of"]

CLIP_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77
)
CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
)
HPS_CONFIG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
IR_VISION = dict(width=64, depth=2, patch=16, image_size=32)  # one 64-wide head, 2×2 patches
IR_MED = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=40,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
    model_type="bert",
    add_cross_attention=True,
)
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def save_tiny_clip(directory: Path, seed: int = 0, logit_scale: float = 4.6052) -> Path:
    """A CLIPModel (vision 32², patch 8, projection 16) and its tokenizer; exp(logit_scale) ≈ 100."""
    from transformers import CLIPConfig, CLIPModel

    from trainer.world.vocabulary import build_tokenizer

    tokenizer = build_tokenizer(WORDS)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config={**CLIP_TEXT, **ids},
        vision_config=CLIP_VISION,
        projection_dim=16,
        logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


#: one transformer layer of width 32 (2 heads), patch 14: the tiny ViT of the DINOv2 and SigLIP towers.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14)


def _save_transformers(model: str, config: str, directory: Path, seed: int, **options) -> Path:
    """``transformers.<model>(<config>(**TINY_VIT, **options))``, seeded, saved to ``directory``."""
    import transformers

    torch.manual_seed(seed)
    getattr(transformers, model)(getattr(transformers, config)(**TINY_VIT, **options)).save_pretrained(directory)
    return directory


def save_tiny_dinov2(directory: Path, seed: int = 0) -> Path:
    return _save_transformers("Dinov2Model", "Dinov2Config", directory, seed, image_size=56)


def save_tiny_hps(directory: Path, seed: int = 0) -> Path:
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**HPS_CONFIG)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # not used by the score: a wrong rule would show
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, directory / "HPS_v2.1_compressed.pt")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": HPS_CONFIG}))
    return directory


def aesthetic_head_state(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The published head's layout: scoring_head.{0,2,4,6,8}, dim → 1024 → 128 → 64 → 16 → 1."""
    g = torch.Generator().manual_seed(seed)
    widths, state = [dim, 1024, 128, 64, 16, 1], {}
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        state[f"scoring_head.{2 * i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"scoring_head.{2 * i}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


def save_tiny_aesthetic(directory: Path, seed: int = 0) -> Path:
    _save_transformers("SiglipVisionModel", "SiglipVisionConfig", directory, seed, image_size=28)
    state = aesthetic_head_state(32, seed)
    state["scoring_head.8.bias"] += 5.5  # scores near the published range
    torch.save(state, directory / "aesthetic_predictor_v2_5.pth")
    return directory


def imagereward_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward.pt state dict in the original key layout (tiny widths)."""
    g = torch.Generator().manual_seed(seed)
    w, depth, patch, size = IR_VISION["width"], IR_VISION["depth"], IR_VISION["patch"], IR_VISION["image_size"]
    h, inter, layers = IR_MED["hidden_size"], IR_MED["intermediate_size"], IR_MED["num_hidden_layers"]
    tokens = (size // patch) ** 2 + 1
    state: dict[str, torch.Tensor] = {}

    def linear(key, n_out, n_in):
        state[f"{key}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"{key}.bias"] = torch.randn(n_out, generator=g) * 0.02

    def norm(key, n):
        state[f"{key}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        state[f"{key}.bias"] = 0.1 * torch.randn(n, generator=g)

    v = "blip.visual_encoder."
    state[v + "cls_token"] = torch.randn(1, 1, w, generator=g) * 0.5
    state[v + "pos_embed"] = torch.randn(1, tokens, w, generator=g) * 0.5
    state[v + "patch_embed.proj.weight"] = torch.randn(w, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5
    state[v + "patch_embed.proj.bias"] = torch.randn(w, generator=g) * 0.02
    for i in range(depth):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", w)
        linear(b + "attn.qkv", 3 * w, w)
        linear(b + "attn.proj", w, w)
        norm(b + "norm2", w)
        linear(b + "mlp.fc1", 4 * w, w)
        linear(b + "mlp.fc2", w, 4 * w)
    norm(v + "norm", w)
    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = torch.randn(vocab_size, h, generator=g)
    state[t + "embeddings.position_embeddings.weight"] = torch.randn(IR_MED["max_position_embeddings"], h, generator=g)
    state[t + "embeddings.position_ids"] = torch.arange(IR_MED["max_position_embeddings"]).unsqueeze(0)
    norm(t + "embeddings.LayerNorm", h)
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", h), ("crossattention", w)):
            linear(b + f"{part}.self.query", h, h)
            linear(b + f"{part}.self.key", h, kv_in)
            linear(b + f"{part}.self.value", h, kv_in)
            linear(b + f"{part}.output.dense", h, h)
            norm(b + f"{part}.output.LayerNorm", h)
        linear(b + "intermediate.dense", inter, h)
        linear(b + "output.dense", h, inter)
        norm(b + "output.LayerNorm", h)
    linear("blip.vision_proj", 256, w)  # BLIP's contrastive projections: in the file, unused by the score
    linear("blip.text_proj", 256, h)
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), [(h, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]):
        linear(f"mlp.layers.{i}", n_out, n_in)
    return state


def save_tiny_imagereward(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    vocab_size = len(BERT_VOCAB) + 2  # + [DEC], [ENC]
    (directory / "med_config.json").write_text(json.dumps({**IR_MED, "vocab_size": vocab_size, "encoder_width": 768}))
    torch.save(imagereward_state(vocab_size, seed), directory / "ImageReward.pt")
    return directory
