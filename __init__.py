"""ComfyUI entry point of the PEC node pack. Thin on purpose: the nodes live in comfy_pec.nodes.

Relative import, so the pack works under whatever folder name ComfyUI-Manager gives it and never
shadows another pack's modules through sys.path.
"""

from .comfy_pec.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
