"""ComfyUI glue for the PEC library: the node pack.

Each node is a :class:`~comfy_pec.nodes.spec.NodeSpec` (``definitions.py``) whose ``run`` is thin glue
over plain functions of :mod:`comfy_pec`; :mod:`~comfy_pec.nodes.registry` turns the specs into V3
(``comfy_api.latest``) node classes, or V1 classes on a ComfyUI without the V3 API. ComfyUI itself
(``comfy``, ``folder_paths``) is imported lazily inside the nodes, never at module import time.
"""

from .definitions import SPECS
from .registry import build_nodes

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build_nodes(SPECS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "SPECS"]
