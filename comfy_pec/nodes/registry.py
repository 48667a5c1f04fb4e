"""Turn :class:`~comfy_pec.nodes.spec.NodeSpec` descriptions into ComfyUI node classes: V3 (the first
importable module of :data:`V3_MODULES`) when ComfyUI offers that API, V1 (``INPUT_TYPES`` /
``RETURN_TYPES``) otherwise. ComfyUI modules are imported only inside these functions."""

from __future__ import annotations

import importlib
import os
import random
import string

from .spec import WIDGET_TYPES, In, NodeResult, NodeSpec

__all__ = ["V3_MODULES", "build_nodes", "has_v3_api", "v3_api"]

#: the V3 node APIs, in order of preference. ``v0_0_2`` is a frozen version (ComfyUI 0.3.6x to 0.8.x
#: ship it; 0.8.0 has no later one), so a ComfyUI update cannot change the schema under the nodes;
#: ``latest`` serves a ComfyUI that has dropped it. Without either the nodes are V1 classes.
V3_MODULES = ("comfy_api.v0_0_2", "comfy_api.latest")


def v3_api() -> tuple | None:
    """``(io, ui)`` of the first importable module of :data:`V3_MODULES`, or None (V1 only)."""
    for name in V3_MODULES:
        try:
            module = importlib.import_module(name)
            return module.io, module.ui
        except (ImportError, AttributeError):
            continue
    return None


def has_v3_api() -> bool:
    """Whether this ComfyUI offers a V3 node schema (see :data:`V3_MODULES`)."""
    return v3_api() is not None


def _call(spec: NodeSpec, kwargs: dict) -> NodeResult:
    import torch

    # In input-list mode ComfyUI hands every input over as a list; widgets and sockets that are not
    # declared list inputs take their single value.
    if spec.list_inputs:
        kwargs = {k: v if k in spec.list_inputs else v[0] for k, v in kwargs.items()}
    with torch.no_grad():  # ComfyUI's executor runs under inference mode; direct callers may not
        return spec.run(**kwargs)


def _widget_options(i: In) -> dict:
    values = {
        "default": i.default,
        "min": i.min,
        "max": i.max,
        "step": i.step,
        "tooltip": i.tooltip or None,
        "control_after_generate": i.control_after_generate,
    }
    if i.type == "STRING" and i.multiline:
        values["multiline"] = True
    return {k: v for k, v in values.items() if v is not None}


# ----------------------------------------------------------------------------- V3


def _v3_input(io, i: In):
    common = dict(optional=i.optional, tooltip=i.tooltip or None)
    if i.type == "COMBO":
        extra = {} if i.control_after_generate is None else {"control_after_generate": i.control_after_generate}
        return io.Combo.Input(i.name, options=i.option_list(), default=i.default, **extra, **common)
    if i.type not in WIDGET_TYPES:
        return io.Custom(i.type).Input(i.name, **common)
    kind = {"INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean, "STRING": io.String}[i.type]
    options = {k: v for k, v in _widget_options(i).items() if k != "tooltip"}
    return kind.Input(i.name, **options, **common)


def _v3_node(spec: NodeSpec, io, ui):
    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=spec.node_id,
                display_name=spec.display_name,
                category=spec.category,
                description=spec.description,
                inputs=[_v3_input(io, i) for i in spec.inputs],
                outputs=[
                    io.Custom(o.type).Output(display_name=o.name, tooltip=o.tooltip or None) for o in spec.outputs
                ],
                is_output_node=spec.output_node,
                is_input_list=bool(spec.list_inputs),
            )

        @classmethod
        def execute(cls, **kwargs):
            result = _call(spec, kwargs)
            shown = {}
            if result.preview is not None:
                shown.update(ui.PreviewImage(result.preview, cls=cls).as_dict())
            if result.text is not None:
                shown.update(ui.PreviewText(result.text).as_dict())
            return io.NodeOutput(*result.outputs, ui=shown or None)

    Node.__name__ = Node.__qualname__ = spec.node_id
    return Node


# ----------------------------------------------------------------------------- V1


def _v1_input(i: In) -> tuple:
    if i.type == "COMBO":
        options = (("default", i.default), ("tooltip", i.tooltip), ("control_after_generate", i.control_after_generate))
        return (i.option_list(), {k: v for k, v in options if v is not None and v != ""})
    return (i.type, _widget_options(i) if i.type in WIDGET_TYPES else ({"tooltip": i.tooltip} if i.tooltip else {}))


def _save_preview(images) -> list[dict]:
    """Save a preview batch to ComfyUI's temp folder, as V1 output nodes report images."""
    import folder_paths
    import numpy as np
    from PIL import Image

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    stem = "pec_preview_" + "".join(random.choices(string.ascii_lowercase, k=8))
    saved = []
    for n, image in enumerate(images):
        name = f"{stem}_{n:05d}.png"
        pixels = (image.float().clamp(0, 1) * 255).round().byte().cpu().numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(os.path.join(folder, name), compress_level=1)
        saved.append({"filename": name, "subfolder": "", "type": "temp"})
    return saved


def _v1_node(spec: NodeSpec):
    def input_types(cls):
        required = {i.name: _v1_input(i) for i in spec.inputs if not i.optional}
        optional = {i.name: _v1_input(i) for i in spec.inputs if i.optional}
        return {"required": required, "optional": optional} if optional else {"required": required}

    def run(self, **kwargs):
        result = _call(spec, kwargs)
        shown = {}
        if result.preview is not None:
            shown["images"] = _save_preview(result.preview)
        if result.text is not None:
            shown["text"] = [result.text]
        return {"ui": shown, "result": tuple(result.outputs)} if shown else tuple(result.outputs)

    return type(
        spec.node_id,
        (),
        dict(
            INPUT_TYPES=classmethod(input_types),
            RETURN_TYPES=tuple(o.type for o in spec.outputs),
            RETURN_NAMES=tuple(o.name for o in spec.outputs),
            FUNCTION="run",
            CATEGORY=spec.category,
            DESCRIPTION=spec.description,
            OUTPUT_NODE=spec.output_node,
            INPUT_IS_LIST=bool(spec.list_inputs),
            run=run,
        ),
    )


def build_nodes(specs: list[NodeSpec], v3: bool | None = None) -> tuple[dict, dict]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` for ``specs``; ``v3=None`` picks V3 when
    ComfyUI offers it, ``v3=False`` forces V1 classes."""
    api = v3_api() if v3 is not False else None
    if v3 and api is None:
        raise ImportError(f"V3 nodes asked for, but none of {', '.join(V3_MODULES)} is importable")
    if api is None:
        classes = {spec.node_id: _v1_node(spec) for spec in specs}
    else:
        classes = {spec.node_id: _v3_node(spec, *api) for spec in specs}
    return classes, {spec.node_id: spec.display_name for spec in specs}
