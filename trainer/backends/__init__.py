"""Model families behind one interface (:class:`~trainer.backends.base.Backend`)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from comfy_pec import PECError

from .base import Backend, PromptEmbeds

#: the tiny SD3-architecture model that ships with the project (the embedded default).
EMBEDDED_MODEL = str(Path(__file__).resolve().parent.parent / "toy" / "pretrained")

# diffusers pipeline class (model_index.json "_class_name") -> family
_PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "ZImagePipeline": "zimage",
    "QwenImagePipeline": "qwenimage",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2-klein",
}
# family -> (module of this package, backend class): adding a family is one file and one line here.
_BACKENDS = {
    "sd3": ("sd3", "SD3Backend"),
    "flux": ("flux", "FluxBackend"),
    "zimage": ("zimage", "ZImageBackend"),
    "qwenimage": ("qwenimage", "QwenImageBackend"),
    "flux2": ("flux2", "Flux2Backend"),
    "flux2-klein": ("flux2", "Flux2KleinBackend"),
}
#: the supported model families.
FAMILIES = tuple(_BACKENDS)


def detect_family(path_or_id: str) -> str:
    """The family of a local diffusers pipeline directory, from its model_index.json."""
    index = os.path.join(path_or_id, "model_index.json")
    if not os.path.isfile(index):
        raise PECError(
            f"{path_or_id}: no model_index.json here; pass the model family explicitly for hub ids "
            "(--family) or point at a diffusers pipeline directory"
        )
    with open(index, encoding="utf-8") as handle:
        name = json.load(handle).get("_class_name")
    if name not in _PIPELINE_FAMILIES:
        raise PECError(f"{index}: pipeline {name!r} is not supported (supported: {sorted(_PIPELINE_FAMILIES)})")
    return _PIPELINE_FAMILIES[name]


def backend_class(family: str) -> type[Backend]:
    """The backend class of ``family`` (imports its module only)."""
    if family not in _BACKENDS:
        raise PECError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    module, name = _BACKENDS[family]
    return getattr(importlib.import_module(f".{module}", __name__), name)


def load_backend(path_or_id: str | None = None, family: str | None = None, **kwargs) -> Backend:
    """Load a model as a backend; ``None`` loads the embedded tiny model.

    ``path_or_id`` is a hub id, a diffusers pipeline directory, or a single-file transformer
    checkpoint (then ``base=`` names the pipeline that supplies the rest, and the family is detected
    from it). ``kwargs`` go to the backend's ``from_pretrained`` (see
    :meth:`~trainer.backends.pipeline.PipelineBackend.from_pretrained`).
    """
    from .pipeline import is_single_file

    path_or_id = path_or_id or EMBEDDED_MODEL
    if family is None:
        base = kwargs.get("base")
        family = detect_family(base if base and is_single_file(path_or_id) else path_or_id)
    return backend_class(family).from_pretrained(path_or_id, **kwargs)


__all__ = ["Backend", "PromptEmbeds", "EMBEDDED_MODEL", "FAMILIES", "backend_class", "detect_family", "load_backend"]
