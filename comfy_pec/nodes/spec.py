"""A declarative node description that :mod:`comfy_pec.nodes.registry` turns into a ComfyUI V3 node
(``comfy_api.latest``) or, on a ComfyUI without it, a V1 node class. One description per node, so the
two schemas cannot drift apart. Nothing here imports ComfyUI."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WIDGET_TYPES", "In", "NodeResult", "NodeSpec", "Out"]

#: input types shown as widgets; every other type is a socket (MODEL, IMAGE, PEC_ENCODER, ...).
WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


@dataclass(frozen=True)
class In:
    """One input. ``options`` (COMBO) is a list or a function returning one (evaluated each time the
    schema is built, so file lists stay fresh)."""

    name: str
    type: str
    tooltip: str = ""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None
    optional: bool = False
    multiline: bool = False
    #: INT/COMBO: the front end adds a "control after generate" widget (fixed/increment/randomize) after
    #: this one; None leaves it to the front end, which adds one to INT inputs named seed/noise_seed.
    control_after_generate: bool | None = None

    def option_list(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options or [])


@dataclass(frozen=True)
class Out:
    name: str
    type: str
    tooltip: str = ""


@dataclass
class NodeResult:
    """What a node's ``run`` returns: its outputs, and what to show in the node (images, text)."""

    outputs: tuple
    preview: Any = None  # IMAGE [B, H, W, 3] shown in the node
    text: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A node: id (``PEC...``), display name, category (``PEC/...``), inputs, outputs and ``run``
    (called with the inputs as keyword arguments, returns a :class:`NodeResult`).

    ``list_inputs`` names inputs that receive *lists* (ComfyUI's input-list mode: the node runs once on
    everything a list-producing node sends); the other inputs arrive unwrapped.
    """

    node_id: str
    display_name: str
    category: str
    description: str
    inputs: Sequence[In]
    outputs: Sequence[Out]
    run: Callable[..., NodeResult]
    output_node: bool = False
    list_inputs: frozenset = field(default_factory=frozenset)
