"""Rewards on a CLIP model: PickScore and CLIP score (one module: same network, same embeddings).

Both embed the image with the tower's image projection and the prompt with the text projection,
L2-normalise, and take the cosine ``c = <img, txt> / (|img|·|txt|)``:

- **PickScore** (Kirstain et al. 2023, yuvalkirstain/PickScore_v1, a CLIP-H/14 in transformers
  format): ``r = exp(logit_scale) · c`` with the checkpoint's learned ``logit_scale`` (≈ 100 in the
  published weights) — the PickScore repository's scoring rule.
- **CLIP score** (openai/clip-vit-large-patch14): ``r = max(c, 0)``, Hessel et al.'s CLIPScore with
  weight w = 1, the scale of the PEC/MixGRPO tables (≈ 0.40). The CLIPScore paper's w = 2.5 or
  torchmetrics' w = 100 is the reward term's ``weight``.

The image side goes through :func:`comfy_pec.encoders.shared_tower`: the PickScore perceptual
encoder of the same weights and device is the same network, and the images of the last batch are
embedded once for both. Prompts are tokenised by the model's own tokenizer when its directory
ships one, else by the tokenizer its authors use (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for
PickScore), padded, truncated at 77 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy_pec.encoders import TOWERS, pooled_output, shared_tower

from .base import ModelReward, load_tokenizer


class _CLIPSimilarity(ModelReward):
    """Cosine of CLIP image and text embeds → a score (``rule``), batched."""

    kind: str
    tokenizer_fallback: str

    def __init__(self, path: str | None = None, device=None, batch_size: int = 32):
        super().__init__(device, batch_size)
        self.tower = shared_tower(self.kind, path, self.device)
        self.tokenizer = load_tokenizer(
            path or TOWERS[self.kind].default, self.tokenizer_fallback, f"reward {self.kind!r}"
        )

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeds ``[B, D]`` float32."""
        model = self.tower.model
        max_length = model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return pooled_output(
            model.get_text_features(
                input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
            )
        ).float()

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``cos(img, txt)`` per pair ``[B]``; the image features come from the shared tower's memo
        when the encoder (or an earlier call) has just embedded the same images."""
        img = F.normalize(self.tower(images, self.batch_size), dim=-1)
        step = self.batch_size
        txt = torch.cat([self.text_features(prompts[i : i + step]) for i in range(0, len(prompts), step)])
        return (img * F.normalize(txt, dim=-1)).sum(-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.rule(self.cosine(images, prompts))


class PickScore(_CLIPSimilarity):
    """``exp(logit_scale) · cos(img, txt)`` on PickScore_v1."""

    kind = "pickscore"
    tokenizer_fallback = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def rule(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.tower.model.logit_scale.exp().float() * cosine


class CLIPScore(_CLIPSimilarity):
    """``max(cos(img, txt), 0)`` on CLIP ViT-L/14 (CLIPScore with w = 1)."""

    kind = "clip"
    tokenizer_fallback = "openai/clip-vit-large-patch14"

    def rule(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine.clamp_min(0.0)
