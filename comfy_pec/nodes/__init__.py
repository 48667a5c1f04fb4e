"""ComfyUI glue for the PEC library. Node classes are registered here as they land (see the issue
tracker); each is thin glue over plain functions of comfy_pec that tests call without ComfyUI.
ComfyUI itself (``comfy``) is imported lazily inside the nodes, never at module import time."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
