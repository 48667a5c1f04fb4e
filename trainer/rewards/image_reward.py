"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules, loading the published checkpoint.

The published ``image-reward`` package does not run on transformers 5, so the architecture is
rebuilt here from transformers parts and the checkpoint ``ImageReward.pt`` (hub repo
``THUDM/ImageReward``, original key layout) is converted at load time.

Architecture (BLIP ITM-style, ImageReward's ``score``):

- image: BLIP ViT-L/16 at 224² (pre-norm blocks, fused qkv, LayerNorm eps 1e-6, a final norm) →
  token features ``v`` ``[B, 1 + 196, 1024]`` (:class:`~transformers.BlipVisionModel`, whose
  ``last_hidden_state`` is after ``post_layernorm``);
- text: BLIP's BERT-base ("med") with cross-attention to ``v`` in every layer, bidirectional, on
  the prompt tokenised by ``bert-base-uncased`` plus ``[DEC]`` / ``[ENC]`` specials, padded to 35
  tokens; the ``[CLS]`` output is the 768-d prompt-conditioned feature ``f``
  (:class:`~transformers.BlipTextModel`; ``f`` is also the "ImageReward space" of docs/design.md §7);
- head: ``768 → 1024 → 128 → 64 → 16 → 1`` linear layers, no activation (dropout in training only);
- ``r = (head(f) - μ) / σ`` with μ = 0.16717362830052426, σ = 1.0333394966054072 (the constants in
  ImageReward's ``ImageReward.__init__``).

Preprocessing: shortest side to 224 (bicubic), center crop 224, OpenAI CLIP mean/std.

Local ``path``: a directory holding ``ImageReward.pt`` and ``med_config.json`` (the hub repo's
files) and optionally the BERT tokenizer (``vocab.txt``); without one the tokenizer comes from
``bert-base-uncased``. The vision width, depth, patch size and image size are read off the
checkpoint's shapes (heads = width / 64, as in BLIP's ViT-B and ViT-L).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from comfy_pec import PECError
from comfy_pec.encoders import CLIP_MEAN, CLIP_STD, Preprocess

from .base import ModelReward, linear_stack, load_tokenizer, load_torch_file

HUB_ID, CHECKPOINT, MED_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"
TOKENIZER_ID = "bert-base-uncased"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35  # ImageReward pads and truncates prompts to 35 tokens
HEAD_WIDTHS, HEAD_DROPOUTS = (1024, 128, 64, 16, 1), (0.2, 0.2, 0.1, None, None)

#: original ViT key (under ``blip.visual_encoder.``) → transformers BlipVisionModel key.
_VISION_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"norm\.", "post_layernorm."),
]
#: parts of the checkpoint the score does not use (BLIP's contrastive projections, buffers).
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys → :class:`ImageRewardModel` keys.

    ``blip.visual_encoder.*`` → ``vision.*`` (timm ViT names → BLIP vision names),
    ``blip.text_encoder.*`` → ``text.*`` (transformers' BLIP text model keeps med's names),
    ``mlp.layers.*`` → ``head.*``; unused keys are dropped. Unknown keys are kept, so that a strict
    load reports them.
    """
    out = {}
    for key, value in original.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            for pattern, repl in _VISION_KEYS:
                if re.match(pattern, rest):
                    rest = re.sub("^" + pattern, repl, rest)
                    break
            out["vision." + rest] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            out["head." + key.removeprefix("mlp.layers.")] = value
        else:
            out[key] = value
    return out


def blip_configs(original: dict[str, torch.Tensor], med_config: dict):
    """``(BlipVisionConfig, BlipTextConfig)`` for a checkpoint in the original layout."""
    from transformers import BlipTextConfig, BlipVisionConfig

    prefix = "blip.visual_encoder."
    try:
        width = original[prefix + "cls_token"].shape[-1]
        patch = original[prefix + "patch_embed.proj.weight"].shape[-1]
        tokens = original[prefix + "pos_embed"].shape[1]
        hidden = original[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise PECError(f"not an ImageReward checkpoint: no {err.args[0]}") from None
    depth = 1 + max(int(m.group(1)) for k in original if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=width // 64,
        image_size=round((tokens - 1) ** 0.5) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    m = med_config
    text = BlipTextConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        hidden_act=m.get("hidden_act", "gelu"),
        layer_norm_eps=m.get("layer_norm_eps", 1e-12),
        pad_token_id=m.get("pad_token_id", 0),
        encoder_hidden_size=width,  # BLIP replaces med's encoder_width by the ViT width
        is_decoder=True,  # builds the cross-attention layers; the forward runs bidirectionally
    )
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """BLIP vision + cross-attending BLIP text encoder + MLP head (keys after :func:`convert_state_dict`)."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = linear_stack(text_config.hidden_size, HEAD_WIDTHS, HEAD_DROPOUTS)  # the checkpoint's mlp.layers

    def features(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prompt-conditioned ``[CLS]`` feature ``f`` ``[B, 768]`` of preprocessed pixels and tokens."""
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(head(f) - μ) / σ`` ``[B]``."""
        raw = self.head(self.features(pixels, input_ids, attention_mask)).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD

    @classmethod
    def from_original(cls, original: dict[str, torch.Tensor], med_config: dict, what: str = "ImageReward"):
        """Build from a state dict in the original ``image-reward`` layout (strict: every weight the
        score needs must be there, and no unknown key)."""
        model = cls(*blip_configs(original, med_config))
        try:
            model.load_state_dict(convert_state_dict(original))
        except RuntimeError as err:
            raise PECError(f"{what}: checkpoint does not fit ImageReward: {str(err).splitlines()[0]}") from None
        return model


def load_tokenizer_with_specials(path: str | None):
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` special tokens."""
    tokenizer = load_tokenizer(path, TOKENIZER_ID, "reward 'imagereward'", cls="BertTokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(ModelReward):
    """ImageReward v1.0 score ``[B]``; ``path``: hub id or a directory with the hub repo's files."""

    def __init__(self, path: str | None = None, device=None, batch_size: int = 16):
        from comfy_pec.pretrained import is_local, resolve_file

        super().__init__(device, batch_size)
        what = "reward 'imagereward'"
        source = path or HUB_ID
        checkpoint = resolve_file(source, CHECKPOINT, what)
        med_config = json.loads(resolve_file(source, MED_CONFIG, what).read_text(encoding="utf-8"))
        original = load_torch_file(checkpoint, what)
        if not isinstance(original, dict):
            raise PECError(f"{what}: {checkpoint} is not a state dict")
        model = ImageRewardModel.from_original(original, med_config, f"{what} ({checkpoint})")
        self.model = model.float().to(self.device).eval().requires_grad_(False)
        size = model.vision.config.image_size
        self.pixels = Preprocess(size, resize=size, mean=CLIP_MEAN, std=CLIP_STD)
        local_dir = Path(source) if path is not None and is_local(source) and Path(source).is_dir() else None
        self.tokenizer = load_tokenizer_with_specials(str(local_dir) if local_dir else None)

    def _inputs(self, images: torch.Tensor, prompts: list[str]):
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return self.pixels(images, self.device), tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The 768-d prompt-conditioned features ``[B, 768]`` (docs/design.md §7's ImageReward space), CPU."""
        return self.batched(lambda x, p: self.model.features(*self._inputs(x, p)), images, list(prompts)).cpu()

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.model(*self._inputs(images, prompts))
