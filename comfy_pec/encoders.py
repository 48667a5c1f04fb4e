"""Perceptual encoders behind one interface (DESIGN §1, §5, §7).

A :class:`PerceptualEncoder` maps images to feature vectors: ``forward(images) -> [B, dim]``
float32, L2-normalised by default (perceptual entropy and Vendi use the cosine geometry).
Images are ComfyUI ``IMAGE`` tensors ``[B, H, W, 3]`` or torch ``[B, 3, H, W]``, float in [0, 1]
(a single image without batch axis is accepted too). Preprocessing -- layout, resize, per-channel
normalisation -- happens in torch, so gradients flow back to the pixels (the perceptual entropy
regulariser of DESIGN §6 differentiates through it).

Subclasses set ``name``, ``dim``, ``input_size`` (the side the network wants), ``image_mean`` /
``image_std`` and implement :meth:`PerceptualEncoder.embed` on preprocessed pixels. The real
encoders (DINOv2, CLIP, PickScore image tower) will wrap transformers / open_clip models the same
way; importing this module pulls in neither.

:class:`ToyEncoder` is a small CNN for the embedded shapes world, trained by the project
(``pec toy train-encoder``) and shipped in ``comfy_pec/assets/`` so that perceptual entropy and
Vendi run on a CPU. ``load_encoder("toy")`` returns it with the shipped weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from . import PECError

__all__ = ["ASSETS_DIR", "ENCODERS", "PerceptualEncoder", "ToyEncoder", "load_encoder"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class PerceptualEncoder(torch.nn.Module):
    """Base class: images in [0, 1] → features ``[B, dim]`` float32.

    Args:
        normalize: L2-normalise the features (default; DESIGN §5).
    """

    name: str = "base"
    dim: int
    #: side (pixels) of the square input of the network; images are resized to it.
    input_size: int
    image_mean: Sequence[float] = (0.0, 0.0, 0.0)
    image_std: Sequence[float] = (1.0, 1.0, 1.0)

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    @staticmethod
    def to_nchw(images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` / ``[B, 3, H, W]`` / one image without batch → float ``[B, 3, H, W]``."""
        if not torch.is_tensor(images):
            raise PECError(f"images must be a torch tensor, got {type(images).__name__}")
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4:
            raise PECError(f"images must be [B, H, W, 3] or [B, 3, H, W], got {tuple(images.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)  # ComfyUI IMAGE layout
        if x.shape[1] != 3:
            raise PECError(f"images must have 3 channels, got shape {tuple(images.shape)}")
        return x if x.is_floating_point() else x.float() / 255.0

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Layout, resize to ``input_size`` (antialiased bilinear) and normalise: ``[B, 3, S, S]``."""
        param = next(self.parameters())
        x = self.to_nchw(images).to(param.device, param.dtype)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw features ``[B, dim]`` of preprocessed pixels ``[B, 3, S, S]``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.embed(self.preprocess(images)).float()
        return F.normalize(features, dim=-1) if self.normalize else features


# ----------------------------------------------------------------------------------------------
# Toy encoder
# ----------------------------------------------------------------------------------------------

#: architecture of the shipped toy encoder (stored beside its weights as toy_encoder.json).
TOY_ENCODER_CONFIG = dict(
    input_size=64,
    stem=(32, 2),  # (channels, patch): a patchify conv, 64 -> 32 px
    # (out_channels, stride) of the 3x3 conv + BatchNorm + SiLU stages: 32 -> 4 px
    stages=((48, 2), (64, 1), (96, 2), (96, 2)),
    hidden=256,
    dim=128,
)


class ToyEncoder(PerceptualEncoder):
    """A small CNN for 64×64 images of the shapes world (any input size is resized to 64).

    A patchify stem and conv stages down to a 4×4 map, flattened (so position stays in the
    features, unlike with global pooling), then ``Linear → SiLU → Linear`` to ``dim`` features (no
    final activation: the features span both signs, so the cosine kernel of unrelated images is
    not inflated). Trained
    with heads on these features that predict shape, colour and population codes of position,
    size, rotation, appearance and background (:mod:`trainer.toy.encoder_train`), so images that
    differ in any of those are far apart in feature space.
    """

    name = "toy"
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)

    def __init__(self, input_size: int = 64, stem=TOY_ENCODER_CONFIG["stem"],
                 stages=TOY_ENCODER_CONFIG["stages"], hidden: int = 256, dim: int = 128,
                 normalize: bool = True):
        super().__init__(normalize)
        self.input_size, self.dim = int(input_size), int(dim)
        self.config = dict(input_size=self.input_size, stem=list(stem),
                           stages=[list(s) for s in stages], hidden=int(hidden), dim=self.dim)
        cin, patch = stem
        layers = [torch.nn.Conv2d(3, cin, patch, patch), torch.nn.BatchNorm2d(cin), torch.nn.SiLU()]
        side = self.input_size // patch
        for cout, stride in stages:
            layers += [torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                       torch.nn.BatchNorm2d(cout), torch.nn.SiLU()]
            cin, side = cout, (side + stride - 1) // stride
        self.convs = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(torch.nn.Flatten(),
                                        torch.nn.Linear(cin * side * side, hidden),
                                        torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(pixels))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, normalize: bool = True,
                        device="cpu") -> ToyEncoder:
        """Load ``<stem>.safetensors`` + ``<stem>.json`` (default: the shipped weights), eval mode."""
        from safetensors.torch import load_file

        weights = Path(path) if path is not None else ASSETS_DIR / "toy_encoder.safetensors"
        config_file = weights.with_suffix(".json")
        if not weights.is_file() or not config_file.is_file():
            raise PECError(f"toy encoder weights not found: {weights} (+ {config_file.name}); "
                           "train them with `pec toy train-encoder`")
        model = cls(**json.loads(config_file.read_text()), normalize=normalize)
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``<stem>.safetensors`` (float32) and ``<stem>.json`` (the config); returns the weights path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "encoder": self.name})
        path.with_suffix(".json").write_text(json.dumps(self.config, indent=2) + "\n")
        return path


#: encoders ``load_encoder`` knows by name.
ENCODERS = {"toy": ToyEncoder}


def load_encoder(name: str = "toy", *, normalize: bool = True, device="cpu",
                 path: str | Path | None = None) -> PerceptualEncoder:
    """A perceptual encoder by name, with its weights, frozen, in eval mode."""
    if name not in ENCODERS:
        raise PECError(f"unknown perceptual encoder {name!r}; available: {sorted(ENCODERS)}")
    return ENCODERS[name].from_pretrained(path, normalize=normalize, device=device)
