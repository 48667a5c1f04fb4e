"""Perceptual encoders behind one interface (docs/design.md §1, §5, §7).

A :class:`PerceptualEncoder` maps images to feature vectors: ``forward(images) -> [B, dim]``
float32, L2-normalised by default (perceptual entropy and Vendi use the cosine geometry).
Images are ComfyUI ``IMAGE`` tensors ``[B, H, W, 3]`` or torch ``[B, 3, H, W]``, float in [0, 1]
(a single image without batch axis is accepted too). Preprocessing -- layout, resize, per-channel
normalisation -- happens in torch, so gradients flow back to the pixels (the perceptual entropy
regulariser of docs/design.md §6 differentiates through it).

Subclasses set ``name``, ``dim``, ``pixels`` (a :class:`Preprocess`: resize, center-crop, the
model's published mean/std) and implement :meth:`PerceptualEncoder.embed` on preprocessed pixels.

The real encoders — ``dinov2`` (CLS token), ``clip`` and ``pickscore`` (CLIP image embeds) — wrap a
transformers model in an :class:`ImageTower` loaded from a hub id or a local directory. Towers are
shared: :func:`shared_tower` returns one instance per (kind, weights, device) while anyone holds it,
so the PickScore reward (``trainer.rewards``) and the PickScore perceptual encoder use one network,
and the tower's :class:`FeatureMemo` returns the features of a batch it has just embedded instead of
embedding it again. transformers is imported only when a real encoder is loaded.

:class:`ToyEncoder` is a small CNN for the embedded shapes world, trained by the project
(``pec toy train-encoder``) and shipped in ``comfy_pec/assets/`` so that perceptual entropy and
Vendi run on a CPU. ``load_encoder("toy")`` returns it with the shipped weights.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import PECError

__all__ = ["ASSETS_DIR", "ENCODERS", "PerceptualEncoder", "ToyEncoder", "load_encoder"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


#: normalisation constants published with the models (mean, std per RGB channel, pixels in [0, 1]).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


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


@dataclass(frozen=True)
class Preprocess:
    """Pixels as a network wants them, in torch (differentiable): resize, center-crop, normalise.

    ``resize=None``: resize straight to ``size × size`` (SigLIP, the toy encoder). Otherwise the
    shortest side goes to ``resize`` (the other to ``int(resize · long / short)``) and the central
    ``size × size`` is cut out (CLIP: resize = size; DINOv2: 256 then 224). Interpolation is
    antialiased like PIL's; bicubic results are clamped to [0, 1] as PIL's 8-bit output is.
    Then ``(x - mean) / std`` per channel.
    """

    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mode: str = "bicubic"

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if self.mode == "bicubic" else x

    def __call__(self, images: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
        """Images in [0, 1], any layout :func:`to_nchw` takes → ``[B, 3, size, size]``."""
        x = to_nchw(images).to(device, dtype)
        if self.resize is None:
            x = self._interpolate(x, (self.size, self.size))
        else:
            h, w = x.shape[-2:]
            short, long = min(h, w), max(h, w)
            other = int(self.resize * long / short)
            x = self._interpolate(x, (self.resize, other) if h <= w else (other, self.resize))
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class PerceptualEncoder(torch.nn.Module):
    """Base class: images in [0, 1] → features ``[B, dim]`` float32.

    Subclasses set ``name``, ``dim``, ``pixels`` (their :class:`Preprocess`) and implement
    :meth:`embed` on preprocessed pixels (or override :meth:`features`).

    Args:
        normalize: L2-normalise the features (default; docs/design.md §5).
    """

    name: str = "base"
    dim: int
    pixels: Preprocess

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    to_nchw = staticmethod(to_nchw)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Layout, resize, crop and normalise on the encoder's device and dtype: ``[B, 3, S, S]``."""
        param = next(self.parameters())
        return self.pixels(images, param.device, param.dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw features ``[B, dim]`` of preprocessed pixels ``[B, 3, S, S]``."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) features ``[B, dim]`` float32 of images in [0, 1]."""
        return self.embed(self.preprocess(images)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
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

    def __init__(
        self,
        input_size: int = 64,
        stem=TOY_ENCODER_CONFIG["stem"],
        stages=TOY_ENCODER_CONFIG["stages"],
        hidden: int = 256,
        dim: int = 128,
        normalize: bool = True,
    ):
        super().__init__(normalize)
        self.input_size, self.dim = int(input_size), int(dim)
        self.pixels = Preprocess(self.input_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), mode="bilinear")
        self.config = dict(
            input_size=self.input_size,
            stem=list(stem),
            stages=[list(s) for s in stages],
            hidden=int(hidden),
            dim=self.dim,
        )
        cin, patch = stem
        layers = [torch.nn.Conv2d(3, cin, patch, patch), torch.nn.BatchNorm2d(cin), torch.nn.SiLU()]
        side = self.input_size // patch
        for cout, stride in stages:
            layers += [
                torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                torch.nn.BatchNorm2d(cout),
                torch.nn.SiLU(),
            ]
            cin, side = cout, (side + stride - 1) // stride
        self.convs = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(cin * side * side, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim),
        )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(pixels))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, normalize: bool = True, device="cpu") -> ToyEncoder:
        """Load ``<stem>.safetensors`` + ``<stem>.json`` (default: the shipped weights), eval mode."""
        from safetensors.torch import load_file

        weights = Path(path) if path is not None else ASSETS_DIR / "toy_encoder.safetensors"
        config_file = weights.with_suffix(".json")
        if not weights.is_file() or not config_file.is_file():
            raise PECError(
                f"toy encoder weights not found: {weights} (+ {config_file.name}); "
                "train them with `pec toy train-encoder`"
            )
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


# ----------------------------------------------------------------------------------------------
# Real image towers (transformers), shared with the reward models
# ----------------------------------------------------------------------------------------------


class FeatureMemo:
    """The features of the last batch of images, reused when the same pixels come again.

    A hit needs the same tensor memory (storage, strides, dtype) at the same version counter
    (in-place writes bump it), so a hit can only return features of identical pixels; a row range
    of the stored batch (``images[i:j]``, or the chunks ``Tensor.split`` makes) hits too. The memo
    holds a reference to the stored images, so their memory cannot be reused under it.
    """

    def __init__(self):
        self._images: torch.Tensor | None = None
        self._version = -1
        self._features: torch.Tensor | None = None

    def lookup(self, images: torch.Tensor) -> torch.Tensor | None:
        """Features ``[B, D]`` of ``images`` if they are (a row range of) the stored batch, else None."""
        base = self._images
        if base is None or images.dim() != base.dim() or images.dtype != base.dtype:
            return None
        if images.device != base.device or images.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            return None
        if images._version != self._version or images.shape[1:] != base.shape[1:] or images.stride() != base.stride():
            return None
        offset, step = images.storage_offset() - base.storage_offset(), base.stride(0)
        if offset == 0:
            start = 0
        elif step > 0 and offset % step == 0:
            start = offset // step
        else:
            return None
        if start < 0 or start + images.shape[0] > base.shape[0]:
            return None
        return self._features[start : start + images.shape[0]]

    def store(self, images: torch.Tensor, features: torch.Tensor) -> None:
        self._images, self._version, self._features = images, images._version, features

    def clear(self) -> None:
        self._images, self._version, self._features = None, -1, None


def pooled_output(output) -> torch.Tensor:
    """transformers ≥ 5 returns a model output from ``get_*_features`` (features in
    ``.pooler_output``); 4.x returns the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


@dataclass(frozen=True)
class TowerSpec:
    """How to load one kind of image tower and read its features."""

    model_class: str  # a transformers class name
    model_types: tuple[str, ...]  # accepted config.json model_type values
    default: str  # hub id of the published weights
    pixels: Callable[[object], Preprocess]  # model config → preprocessing
    features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (model, pixels) → [B, D]
    dim: Callable[[object], int]  # model config → D


def _clip_pixels(config) -> Preprocess:
    size = config.vision_config.image_size
    return Preprocess(size, resize=size, mean=CLIP_MEAN, std=CLIP_STD)


def _clip_tower(default: str) -> TowerSpec:
    return TowerSpec(
        "CLIPModel",
        ("clip",),
        default,
        _clip_pixels,
        lambda model, px: pooled_output(model.get_image_features(pixel_values=px)),
        lambda config: config.projection_dim,
    )


#: the real towers by kind. The full CLIPModel is loaded for "clip" / "pickscore" (not only the
#: vision half) so that the CLIP-score / PickScore rewards share it (their text tower).
TOWERS: dict[str, TowerSpec] = {
    # CLS token after the final layernorm; BitImageProcessor: shortest side 256, crop 224, ImageNet stats.
    "dinov2": TowerSpec(
        "Dinov2Model",
        ("dinov2",),
        "facebook/dinov2-base",
        lambda config: Preprocess(224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        lambda model, px: model(pixel_values=px).pooler_output,
        lambda config: config.hidden_size,
    ),
    "clip": _clip_tower("openai/clip-vit-large-patch14"),
    "pickscore": _clip_tower("yuvalkirstain/PickScore_v1"),
}


class ImageTower(torch.nn.Module):
    """A frozen transformers vision network with its preprocessing: images → raw features.

    One instance per (kind, weights, device) is shared by everything that asks
    :func:`shared_tower` for it — the perceptual encoder and the reward model built on the same
    network (PickScore, as in the paper) — and it remembers the features of the last batch
    (:class:`FeatureMemo`), so images scored by the reward are not embedded again for the
    perceptual space. The memo is bypassed when the images require grad and for inference tensors.
    """

    def __init__(self, kind: str, model: torch.nn.Module, source: str):
        super().__init__()
        spec = TOWERS[kind]
        self.kind, self.source, self.model, self.spec = kind, source, model, spec
        self.pixels = spec.pixels(model.config)
        self.dim = int(spec.dim(model.config))
        self.memo = FeatureMemo()

    @classmethod
    def load(cls, kind: str, path: str | Path | None = None, device="cpu") -> ImageTower:
        """Load the tower's weights from a hub id or local directory (default: :data:`TOWERS` ``default``)."""
        import transformers

        from .pretrained import load_model

        spec = TOWERS[kind]
        source = str(path) if path is not None else spec.default
        model = load_model(
            getattr(transformers, spec.model_class), source, spec.model_types, f"image tower {kind!r}", device
        )
        return cls(kind, model, source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images in [0, 1] (any :func:`to_nchw` layout) → raw features ``[B, D]`` float32,
        ``batch_size`` images at a time (all at once by default)."""
        # inference tensors (ComfyUI runs under inference_mode) have no version counter to key on
        memoise = not images.is_inference() and not (torch.is_grad_enabled() and images.requires_grad)
        if memoise and (hit := self.memo.lookup(images)) is not None:
            return hit.clone()  # callers may write into their features; the memo's stay intact
        x = to_nchw(images)
        chunks = x.split(batch_size or x.shape[0])
        feats = torch.cat([self.spec.features(self.model, self.pixels(c, self.device)).float() for c in chunks])
        if memoise:
            self.memo.store(images, feats)
        return feats


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shared_tower(kind: str, path: str | Path | None = None, device="cpu") -> ImageTower:
    """The :class:`ImageTower` for (kind, weights, device), loaded on first use and shared while
    anyone holds it (a weak cache: dropping every user frees the model)."""
    from .pretrained import is_local

    if kind not in TOWERS:
        raise PECError(f"unknown image tower {kind!r}; available: {sorted(TOWERS)}")
    source = TOWERS[kind].default if path is None else str(path)
    if is_local(source):
        source = str(Path(source).expanduser().resolve())
    key = (kind, source, _device_key(device))
    tower = _SHARED.get(key)
    if tower is None:
        tower = ImageTower.load(kind, source, key[2])
        _SHARED[key] = tower
    return tower


class TowerEncoder(PerceptualEncoder):
    """A perceptual encoder on a shared :class:`ImageTower` (DINOv2 CLS, CLIP / PickScore image
    embeds). Preprocessing is the tower's (:data:`TOWERS`); features go through its memo."""

    name = "tower"

    def __init__(self, tower: ImageTower, normalize: bool = True):
        super().__init__(normalize)
        self.tower, self.dim, self.pixels = tower, tower.dim, tower.pixels

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, normalize: bool = True, device="cpu") -> TowerEncoder:
        return cls(shared_tower(cls.name, path, device), normalize)


class DINOv2Encoder(TowerEncoder):
    """DINOv2 (``Dinov2Model``): the CLS token after the last layernorm; default facebook/dinov2-base."""

    name = "dinov2"


class CLIPEncoder(TowerEncoder):
    """CLIP image embeds (``CLIPModel.get_image_features``); default openai/clip-vit-large-patch14."""

    name = "clip"


class PickScoreEncoder(TowerEncoder):
    """The PickScore image tower (a CLIP-H ``CLIPModel``); default yuvalkirstain/PickScore_v1."""

    name = "pickscore"


#: encoders ``load_encoder`` knows by name.
ENCODERS = {"toy": ToyEncoder, "dinov2": DINOv2Encoder, "clip": CLIPEncoder, "pickscore": PickScoreEncoder}


def load_encoder(
    name: str = "toy", *, normalize: bool = True, device="cpu", path: str | Path | None = None
) -> PerceptualEncoder:
    """A perceptual encoder by name, with its weights (``path``: hub id or local directory; for
    ``toy`` a ``.safetensors`` file), frozen, in eval mode."""
    if name not in ENCODERS:
        raise PECError(f"unknown perceptual encoder {name!r}; available: {sorted(ENCODERS)}")
    return ENCODERS[name].from_pretrained(path, normalize=normalize, device=device)
