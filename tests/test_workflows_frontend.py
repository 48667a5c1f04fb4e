"""The shipped UI-format workflows read by ComfyUI's front-end rules (tests/comfy_frontend.py) give exactly
the shipped API-format files, with the node definitions of the PEC pack (V1 and V3 schema) and of
ComfyUI 0.3.64's core nodes (recorded from its /object_info). The same check against a live server's
/object_info is in test_nodes_comfyui.py; a real browser loads the files in test_frontend_browser.py."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
from comfy_frontend import WorkflowMismatch, api_without_meta, frontend_prompt, has_control_widget, v1_object_info

from comfy_pec.nodes.definitions import SPECS
from comfy_pec.nodes.registry import build_nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))
import build_workflows  # noqa: E402 -- needs the workflows folder on sys.path

NAMES = [make().name for make in build_workflows.WORKFLOWS]


@pytest.fixture(scope="module")
def object_info():
    # ComfyUI's folder registry, empty: the file-list COMBOs have no choices (the check reads only types)
    folders = types.ModuleType("folder_paths")
    folders.models_dir = ""
    folders.get_filename_list = folders.get_folder_paths = lambda *_: []
    folders.add_model_folder_path = lambda *_: None
    core = json.loads((ROOT / "tests" / "data" / "comfyui_0.3.64_core_object_info.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "folder_paths", folders)
        return {**core, **v1_object_info(build_nodes(SPECS, v3=False)[0])}


def _load(name: str) -> tuple[dict, dict]:
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    return ui, api


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_gives_the_api_file_under_the_frontends_widget_rules(name, object_info):
    ui, api = _load(name)
    assert frontend_prompt(ui, object_info) == api_without_meta(api)


def test_seed_inputs_carry_a_control_value_and_a_missing_one_is_caught(object_info):
    ui, _ = _load("pec_batch_diversity")
    entropy = next(n for n in ui["nodes"] if n["type"] == "PECPerceptualEntropy")
    assert entropy["widgets_values"][:2] == [7, "fixed"]  # noise_seed, then its control widget
    broken = copy.deepcopy(ui)
    next(n for n in broken["nodes"] if n["type"] == "PECPerceptualEntropy")["widgets_values"].pop(1)
    with pytest.raises(WorkflowMismatch, match="noise_seed.*needs a control_after_generate value"):
        frontend_prompt(broken, object_info)


def test_control_widget_rule_follows_the_declaration_then_the_name():
    assert has_control_widget("noise_seed", ["INT", {}]) and has_control_widget("seed", ["INT", {}])
    assert not has_control_widget("noise_seed", ["INT", {"control_after_generate": False}])
    assert has_control_widget("step", ["INT", {"control_after_generate": True}])
    assert not has_control_widget("steps", ["INT", {}]) and not has_control_widget("seed", ["FLOAT", {}])
    assert has_control_widget("x", [["a", "b"], {"control_after_generate": True}])
    for name, kind, control in [
        ("seed", "INT", None),
        ("s", "INT", True),
        ("seed", "INT", False),
        ("c", "COMBO", True),
    ]:
        spec = [kind if kind != "COMBO" else ["a"], {} if control is None else {"control_after_generate": control}]
        assert build_workflows.has_control_widget(name, kind, control) == has_control_widget(name, spec)


def test_every_pec_int_named_like_a_seed_declares_its_control_widget():
    for spec in SPECS:
        for i in spec.inputs:
            if i.type == "INT" and "seed" in i.name:
                assert i.control_after_generate is True, (spec.node_id, i.name)


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlapping_nodes(name):
    ui, _ = _load(name)
    title = build_workflows.TITLE_HEIGHT
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - title, n["size"][0], n["size"][1] + title) for n in ui["nodes"]]
    for a, ax, ay, aw, ah in boxes:
        for b, bx, by, bw, bh in boxes:
            if a < b:
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (name, a, b)
