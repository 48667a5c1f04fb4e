"""Aesthetic Predictor v2.5 (discus0434/aesthetic-predictor-v2-5): an MLP on SigLIP image features.

``r = head(p / |p|)`` with ``p`` the pooled output (attention-pooling head) of the SigLIP vision
tower google/siglip-so400m-patch14-384 and ``head`` five linear layers with no activation between
them, ``1152 → 1024 → 128 → 64 → 16 → 1`` (dropout between them in training only). Scores run
about 1–10 (the paper's tables: ≈ 6). Preprocessing as SigLIP's image processor: resize straight to
384 × 384 (bicubic, no crop), mean = std = 0.5.

Weights: the SigLIP model from ``path`` (a hub id or a directory saved by transformers) and the head
``aesthetic_predictor_v2_5.pth`` (a state dict with keys ``scoring_head.{0,2,4,6,8}.{weight,bias}``)
from the same directory, or — with no ``path`` — from the URL the project publishes it at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy_pec import PECError
from comfy_pec.encoders import SIGLIP_MEAN, SIGLIP_STD, Preprocess

from .base import ModelReward, linear_stack, load_torch_file

ENCODER_ID = "google/siglip-so400m-patch14-384"
HEAD_FILE = "aesthetic_predictor_v2_5.pth"
HEAD_URL = "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
HEAD_WIDTHS, HEAD_DROPOUTS = (1024, 128, 64, 16, 1), (0.5, 0.5, 0.5, 0.2, None)


class AestheticV25(ModelReward):
    """Aesthetic score v2.5 ``[B]`` (the prompts are not used)."""

    def __init__(self, path: str | None = None, device=None, batch_size: int = 16):
        from transformers import SiglipVisionModel

        from comfy_pec.pretrained import load_model, resolve_file

        super().__init__(device, batch_size)
        what = "reward 'aesthetic'"
        self.encoder = load_model(
            SiglipVisionModel, path or ENCODER_ID, ("siglip", "siglip_vision_model"), what, self.device
        )
        # the head sits beside a local SigLIP model; the published one is a GitHub file, not on the hub
        if path:
            head_file = resolve_file(path, HEAD_FILE, what)
        else:
            head_file = resolve_file(ENCODER_ID, HEAD_FILE, what, url=HEAD_URL)
        self.head = linear_stack(self.encoder.config.hidden_size, HEAD_WIDTHS, HEAD_DROPOUTS)
        state = load_torch_file(head_file, what)
        try:
            self.head.load_state_dict({k.removeprefix("scoring_head."): v for k, v in dict(state).items()})
        except (RuntimeError, TypeError, ValueError) as err:  # another layout
            raise PECError(f"{what}: {head_file} is not an Aesthetic v2.5 head ({str(err).splitlines()[0]})") from None
        self.head = self.head.float().to(self.device).eval().requires_grad_(False)
        self.pixels = Preprocess(self.encoder.config.image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pooled = self.encoder(pixel_values=self.pixels(images, self.device)).pooler_output
        return self.head(F.normalize(pooled.float(), dim=-1)).squeeze(-1)
