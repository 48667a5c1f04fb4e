"""Where the nodes' perceptual encoders come from: ComfyUI's CLIP_VISION object, a model folder under
``models/pec_encoders``, or the embedded toy encoder. Nothing here imports ComfyUI: the CLIP_VISION
object is used through its ``encode_image`` method only, so tests pass a stand-in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import PECError
from ..encoders import PerceptualEncoder, load_encoder

__all__ = ["ENCODER_TYPES", "ClipVisionEncoder", "guess_encoder_name", "list_encoder_entries", "load_from_folder"]

#: the choices of the loader node's ``encoder_type`` ("auto" guesses from the folder).
ENCODER_TYPES = ("auto", "dinov2", "clip", "pickscore", "toy")


class ClipVisionEncoder(PerceptualEncoder):
    """A ComfyUI ``CLIP_VISION`` model (CLIP, SigLIP or DINOv2 image tower) as a perceptual encoder.

    ``forward(images [B, H, W, 3] in [0, 1]) -> [B, D]``: ComfyUI's own preprocessing (resize, centre
    crop, its mean/std) and its pooled ``image_embeds`` (CLIP's projected embedding, DINOv2's CLS
    token), L2-normalised by default. Inference only: no gradient flows through ComfyUI's encoder.
    """

    name = "clip_vision"

    def __init__(self, clip_vision, normalize: bool = True, crop: bool = True):
        super().__init__(normalize)
        if not callable(getattr(clip_vision, "encode_image", None)):
            raise PECError(f"expected a CLIP_VISION model (with encode_image), got {type(clip_vision).__name__}")
        self.clip_vision = clip_vision
        self.crop = crop

    def features(self, images: torch.Tensor) -> torch.Tensor:
        nhwc = self.to_nchw(images).permute(0, 2, 3, 1)  # ComfyUI's encoder takes the IMAGE layout
        with torch.no_grad():
            embeds = self.clip_vision.encode_image(nhwc, crop=self.crop)["image_embeds"].float()
        return embeds.reshape(embeds.shape[0], -1)


def list_encoder_entries(folders: list[str]) -> list[str]:
    """Loadable entries under the ``pec_encoders`` folders, as relative names, sorted: every sub-folder
    holding a ``config.json`` or ``open_clip_config.json`` (transformers / open_clip models) and every
    ``.safetensors`` file with a ``.json`` beside it (a toy-encoder checkpoint)."""
    found = set()
    for base in folders:
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if {"config.json", "open_clip_config.json"} & set(files) and rel != ".":
                found.add(Path(rel).as_posix())
                dirs.clear()  # a model folder's sub-folders are its own
                continue
            found.update(
                Path(rel, f).as_posix().removeprefix("./")
                for f in files
                if f.endswith(".safetensors") and f[: -len(".safetensors")] + ".json" in files
            )
    return sorted(found)


def guess_encoder_name(path: str | os.PathLike) -> str:
    """The :func:`comfy_pec.encoders.load_encoder` name for a model folder or file.

    A ``.safetensors`` file is a toy-encoder checkpoint. For a folder: ``config.json``'s ``model_type``
    (``dinov2``; ``clip`` → ``pickscore`` when the folder name says PickScore), else the folder name
    (``dino``, ``pickscore``, ``clip``), else an error asking for an explicit type.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return "toy"
    name = path.name.lower()
    model_type = ""
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = str(json.loads(config.read_text()).get("model_type", "")).lower()
        except (OSError, ValueError, AttributeError):
            model_type = ""
    if "dinov2" in model_type or "dino" in name:
        return "dinov2"
    if "pickscore" in name:
        return "pickscore"
    if "clip" in model_type or "clip" in name or (path / "open_clip_config.json").is_file():
        return "clip"
    raise PECError(f"cannot tell which encoder {path} holds; set encoder_type to dinov2, clip or pickscore")


def load_from_folder(path: str | os.PathLike, encoder_type: str = "auto", *, device="cpu") -> PerceptualEncoder:
    """Load the encoder in ``path`` (a folder under ``models/pec_encoders`` or a toy checkpoint) by
    ``encoder_type`` (one of :data:`ENCODER_TYPES`). Any failure is a one-line :class:`PECError`."""
    if encoder_type not in ENCODER_TYPES:
        raise PECError(f"unknown encoder type {encoder_type!r}; expected one of {ENCODER_TYPES}")
    name = guess_encoder_name(path) if encoder_type == "auto" else encoder_type
    try:
        return load_encoder(name, path=path, device=device)
    except PECError:
        raise
    except Exception as err:  # third-party loaders raise anything (OSError, ValueError, KeyError, ...)
        message = " ".join(str(err).split())[:300]
        raise PECError(f"cannot load the {name} encoder from {path}: {type(err).__name__}: {message}") from None
