"""What ComfyUI's front end does with a UI-format workflow file, written from its documented behaviour
(ComfyUI_frontend 1.27-1.35) so tests can check the shipped files without a browser:

- loading: each node gets one widget per widget input of its node definition (``/object_info``), in
  input order (required, then optional), and the saved ``widgets_values`` are assigned to them in order;
  INT inputs declaring ``control_after_generate`` (or, declaring nothing, named ``seed`` / ``noise_seed``)
  and COMBO inputs declaring it get a second "control after generate" widget right after their own;
- queueing (``graphToPrompt``): the API prompt holds every widget's value except the control widgets,
  and ``[source id, slot]`` for each linked socket.

:func:`frontend_prompt` does both and raises :class:`WorkflowMismatch` where the front end would
misread the file (too few or too many values, an INT that is not an int, a value out of range).
"""

from __future__ import annotations

SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class WorkflowMismatch(ValueError):
    """A UI file that the front end would load into the wrong widgets."""


def _kind(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _ordered_inputs(definition: dict) -> list[tuple[str, list]]:
    inputs = definition["input"]
    order = definition.get("input_order") or {k: list(v) for k, v in inputs.items()}
    return [(name, inputs[group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def has_control_widget(name: str, spec: list) -> bool:
    """The front end's rule for the extra "control after generate" widget (``useIntWidget`` /
    ``useComboWidget``): an explicit ``control_after_generate`` option wins; an INT without one gets
    the widget when it is named like a seed."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    declared = options.get("control_after_generate")
    if _kind(spec) == "INT":
        return name in SEED_NAMES if declared is None else bool(declared)
    return _kind(spec) == "COMBO" and bool(declared)


def _check_value(where: str, spec: list, value) -> None:
    kind, options = _kind(spec), (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        raise WorkflowMismatch(f"{where}: {value!r} is not an INT")
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise WorkflowMismatch(f"{where}: {value!r} is not a FLOAT")
    if kind == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowMismatch(f"{where}: {value!r} is not a BOOLEAN")
    if kind == "STRING" and not isinstance(value, str):
        raise WorkflowMismatch(f"{where}: {value!r} is not a STRING")
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            raise WorkflowMismatch(f"{where}: {value!r} outside [{options.get('min')}, {options.get('max')}]")


def combo_options(spec: list) -> list:
    """The choices of a COMBO input, in either schema (V1 ``[choices, {}]``, V3 ``["COMBO", {"options"}]``)."""
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def frontend_prompt(ui: dict, object_info: dict) -> dict:
    """The API prompt (``{id: {"class_type", "inputs"}}``) the front end builds from UI workflow ``ui``
    with the node definitions ``object_info``; raises :class:`WorkflowMismatch` where it would misread it."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        where = f"node {node['id']} ({node['type']})"
        if node["type"] not in object_info:
            raise WorkflowMismatch(f"{where}: no such node type")
        values = list(node.get("widgets_values", []))
        inputs: dict = {}
        for name, spec in _ordered_inputs(object_info[node["type"]]):
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if _kind(spec) not in WIDGET_TYPES or options.get("forceInput"):
                continue
            if not values:
                raise WorkflowMismatch(f"{where}: no saved value for widget {name!r}")
            inputs[name] = values.pop(0)
            _check_value(f"{where} {name}", spec, inputs[name])
            if has_control_widget(name, spec):
                control = values.pop(0) if values else None
                if control not in CONTROL_VALUES:
                    raise WorkflowMismatch(f"{where}: {name!r} needs a control_after_generate value, got {control!r}")
        if values:
            raise WorkflowMismatch(f"{where}: {len(values)} saved widget values left over: {values!r}")
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _id, source, slot, target, _slot, _type = links[socket["link"]]
                assert target == node["id"], f"{where}: link {socket['link']} points elsewhere"
                inputs[socket["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def api_without_meta(api: dict) -> dict:
    """An API-format workflow without the ``_meta`` titles (the front end adds them; /prompt ignores them)."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def v1_object_info(classes: dict) -> dict:
    """``/object_info`` entries of V1 node classes (``INPUT_TYPES`` and friends), as ComfyUI serves them."""
    info = {}
    for name, cls in classes.items():
        types = cls.INPUT_TYPES()
        info[name] = {
            "input": types,
            "input_order": {k: list(v) for k, v in types.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        }
    return info
