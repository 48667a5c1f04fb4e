"""PEC core library: flow-SDE math, diversity metrics, LoRA file layout.

Importing this package is cheap on purpose (ComfyUI imports it at start-up): it pulls in no
submodule, and no submodule imports diffusers, transformers, peft or the trainer at module level.
"""


def _version() -> str:
    """The one version source is ``pyproject.toml``: installed, the package metadata has it; dropped into
    ComfyUI's ``custom_nodes`` without pip, it is read from the file beside the package."""
    from importlib import metadata

    try:
        return metadata.version("comfy-pec")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
        return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def __getattr__(name: str):
    # Computed on first use, so importing the package at ComfyUI start-up reads no metadata.
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PECError(Exception):
    """Base class of every error this project raises on bad input (files, configs, tensors)."""
