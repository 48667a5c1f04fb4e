"""ComfyUI entry point of the PEC node pack. Thin on purpose: the nodes live in comfy_pec.nodes, the
front-end extension that shows each node's report inside the node in comfy_pec/nodes/web (WEB_DIRECTORY).

ComfyUI imports this folder as a package, so the relative import works under whatever folder name
ComfyUI-Manager gives the pack, without sys.path edits. pytest imports this file as a plain module
when the checkout's folder name is not a valid package name; the installed package serves then.
"""

if __package__:
    from .comfy_pec.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    from comfy_pec.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./comfy_pec/nodes/web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
