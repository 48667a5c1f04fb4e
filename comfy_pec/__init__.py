"""PEC core library: flow-SDE math, diversity metrics, LoRA file layout.

Importing this package is cheap on purpose (ComfyUI imports it at start-up): it pulls in no
submodule, and no submodule imports diffusers, transformers, peft or the trainer at module level.
"""

__version__ = "0.1.0"


class PECError(Exception):
    """Base class of every error this project raises on bad input (files, configs, tensors)."""
