"""Pretrained weights from a hub id or a local path, with errors that name what was asked for.

Every real network (perceptual encoders, reward models) is named by one string: a Hugging Face hub
id (``openai/clip-vit-large-patch14``) or a local directory / file holding the same files. Local
paths are checked before anything is loaded, so a wrong directory fails with a :class:`PECError`
that names the path and what it lacks instead of a library traceback. transformers and
huggingface_hub are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from . import PECError

__all__ = ["is_local", "load_model", "resolve_file"]

PathLike = str | Path


def is_local(name: PathLike) -> bool:
    """True for an existing path or anything spelled like one (absolute, ``./``, ``~``)."""
    text = str(name)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or "\\" in text


def _local_config(path: Path, model_types: Sequence[str], what: str) -> None:
    """Fail unless ``path`` is a directory whose ``config.json`` has one of ``model_types``."""
    if not path.is_dir():
        raise PECError(f"{what}: {path} is not a directory (expected a saved {'/'.join(model_types)} model)")
    config = path / "config.json"
    if not config.is_file():
        raise PECError(f"{what}: {path} is not a model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as err:
        raise PECError(f"{what}: cannot read {config} ({err})") from None
    if model_type not in model_types:
        raise PECError(f"{what}: {path} holds a {model_type!r} model, expected {' or '.join(map(repr, model_types))}")


def load_model(cls, name: PathLike, model_types: Sequence[str], what: str, device="cpu"):
    """``cls.from_pretrained(name)`` in float32, frozen, in eval mode, on ``device``.

    Args:
        cls: a transformers model class (``CLIPModel``, ``Dinov2Model``, ...).
        name: hub id or local directory.
        model_types: accepted ``config.json`` ``model_type`` values (checked for local directories).
        what: what the model is for, for error messages (``"perceptual encoder 'dinov2'"``).
    """
    if is_local(name):
        name = Path(name).expanduser().resolve()
        _local_config(name, model_types, what)
    try:
        model = cls.from_pretrained(str(name))
    except (OSError, ValueError) as err:
        raise PECError(f"{what}: cannot load {name} ({str(err).splitlines()[0]})") from None
    return model.float().to(device).eval().requires_grad_(False)


def resolve_file(name: PathLike, filename: str, what: str, url: str | None = None) -> Path:
    """A weights/config file: ``name`` itself (a file), ``name/filename`` (a directory), or
    ``filename`` from the hub repository ``name`` (downloaded or taken from the local cache).

    ``url``: where the file is published when it is not on the hub (fetched through torch.hub's
    cache); used only when ``name`` is not a local path.
    """
    if is_local(name):
        path = Path(name).expanduser().resolve()
        found = path if path.is_file() else path / filename
        if not found.is_file():
            raise PECError(f"{what}: {path} holds no {filename}")
        return found
    try:
        if url is not None:
            import torch.hub

            target = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(target))
            return target
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(name), filename))
    except Exception as err:  # network, offline mode, missing repo/file: one readable message
        raise PECError(f"{what}: cannot fetch {filename} from {url or name} ({str(err).splitlines()[0]})") from None


def dtype_option(dtype) -> dict:
    """The load-precision keyword of this diffusers: ``dtype=`` where it exists (``torch_dtype`` is deprecated
    there, with a FutureWarning), ``torch_dtype=`` on older releases. ``dtype`` may be a dict per component
    (``{"vae": torch.float32, "default": torch.bfloat16}``)."""
    from diffusers.utils import deprecation_utils

    # _resolve_dtype arrived with the dtype= keyword: its presence is the feature, whatever the version string.
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
