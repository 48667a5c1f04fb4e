"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H-14 fine-tuned on HPD.

``r = cos(img, txt)``: the image and text embeddings of the fine-tuned CLIP, each L2-normalised,
dotted — HPSv2's ``score`` takes the diagonal of ``image_features @ text_features.T`` with no logit
scale (scores ≈ 0.25–0.35). Preprocessing as HPSv2's validation transform: shortest side to 224
(bicubic), center crop 224, OpenAI CLIP mean/std. Prompts: open_clip's CLIP BPE tokenizer, 77 tokens.

Weights: ``HPS_v2.1_compressed.pt`` (a dict whose ``state_dict`` is the whole open_clip model) from
the hub repo ``xswu/HPSv2``, or ``path`` = that file or a directory holding it. The architecture is
open_clip's ``ViT-H-14`` unless the directory has an ``open_clip_config.json`` (open_clip's hub
layout: ``{"model_cfg": {...}}``), which is how the tests build a tiny one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from comfy_pec import PECError
from comfy_pec.encoders import CLIP_MEAN, CLIP_STD, Preprocess

from .base import ModelReward, load_torch_file

HUB_ID, CHECKPOINT, ARCH = "xswu/HPSv2", "HPS_v2.1_compressed.pt", "ViT-H-14"


class HPSv21(ModelReward):
    """``cos(img, txt)`` of the HPS v2.1 open_clip model; ``path``: hub id, checkpoint or directory."""

    def __init__(self, path: str | None = None, device=None, batch_size: int = 16):
        import open_clip
        from open_clip.model import CLIP

        from comfy_pec.pretrained import resolve_file

        super().__init__(device, batch_size)
        what = "reward 'hpsv21'"
        checkpoint = resolve_file(path or HUB_ID, CHECKPOINT, what)
        config_file = checkpoint.parent / "open_clip_config.json"
        if path is not None and config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg")
        else:
            config = open_clip.get_model_config(ARCH)
        model = CLIP(**config)
        try:
            model.load_state_dict(_state_dict(checkpoint, what))
        except RuntimeError as err:  # keys or shapes of another architecture
            raise PECError(f"{what}: {checkpoint} does not fit open_clip {ARCH}: {str(err).splitlines()[0]}") from None
        self.model = model.float().to(self.device).eval().requires_grad_(False)
        size = config["vision_cfg"]["image_size"]
        self.pixels = Preprocess(size, resize=size, mean=CLIP_MEAN, std=CLIP_STD)
        context = config["text_cfg"].get("context_length", 77)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.model.encode_image(self.pixels(images, self.device), normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt).sum(-1)


def _state_dict(checkpoint: Path, what: str) -> dict:
    data = load_torch_file(checkpoint, what)
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or "visual.conv1.weight" not in state:
        raise PECError(f"{what}: {checkpoint} is not an open_clip CLIP state dict (no visual.conv1.weight)")
    return state
