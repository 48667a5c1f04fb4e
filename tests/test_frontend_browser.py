"""Each UI workflow in ComfyUI's real front end (headless Chromium through Playwright, against a ComfyUI
server from $COMFYUI_PATH on the CPU): it loads without a dialog, the prompt the front end builds is the
API file, and the workflows that need no large weights run from the browser, with each PEC node's report
shown in the node. Skipped without COMFYUI_PATH, the playwright package or Chromium (PEC_CHROMIUM, default
/usr/bin/chromium). With PEC_SCREENSHOTS=DIR it saves a picture of each workflow after its run there
(the README's, with PEC_DEMO_LORA=runs/demo/pec/lora.safetensors so the LoRA workflows use a trained LoRA).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_frontend import api_without_meta
from comfy_server import comfyui_server, wait_for_prompt

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PEC_CHROMIUM", "/usr/bin/chromium")
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
RUNNABLE = {p.stem for p in UI_FILES if "embedded" in p.stem or p.stem == "pec_score_images_demo"}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (set PEC_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    """A server with the real front end and the demo LoRA, and a Chromium page on it."""
    from test_nodes_comfyui import write_demo_lora

    base = tmp_path_factory.mktemp("browser")
    (base / "models" / "loras").mkdir(parents=True)
    lora = base / "models" / "loras" / "pec_demo.safetensors"
    if os.environ.get("PEC_DEMO_LORA"):  # a trained `pec demo` LoRA for pictures (the test one is random)
        shutil.copyfile(os.environ["PEC_DEMO_LORA"], lora)
    else:
        write_demo_lora(lora)
    with comfyui_server(base, real_frontend=True) as (url, info), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2560, "height": 1440})
        # a first start opens the template browser for new users: mark the tutorial done, as a user would
        request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
        page.wait_for_timeout(2000)
        assert _dialogs(page) == []
        yield url, info, page
        browser.close()


def _dialogs(page) -> list[str]:
    """Texts of the dialogs the front end shows (PrimeVue dialogs; older LiteGraph dialogs)."""
    return page.eval_on_selector_all(".p-dialog, .comfy-modal[style*='flex']", "ds => ds.map(d => d.innerText)")


def _declared(prompt: dict, info: dict) -> dict:
    """The prompt without the inputs a node does not declare (display widgets such as Preview Any's
    "preview", which the server ignores), and without titles."""
    out = {}
    for node_id, node in api_without_meta(prompt).items():
        declared = {name for group in info[node["class_type"]]["input"].values() for name in group}
        out[node_id] = {**node, "inputs": {k: v for k, v in node["inputs"].items() if k in declared}}
    return out


def _screenshot(page, name: str) -> None:
    """With PEC_SCREENSHOTS=DIR: the whole graph fitted into the window, saved as DIR/workflow_<name>.png."""
    folder = os.environ.get("PEC_SCREENSHOTS")
    if not folder:
        return
    page.evaluate(
        """() => { const nodes = window.app.graph._nodes; const c = window.app.canvas;
             const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));
             const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
             const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
             const w = c.canvas.width / devicePixelRatio, h = c.canvas.height / devicePixelRatio;
             const scale = Math.min(w / (x1 - x0 + 80), h / (y1 - y0 + 80), 1);
             c.ds.scale = scale; c.ds.offset = [40 / scale - x0, 40 / scale - y0]; c.setDirty(true, true); }"""
    )
    page.wait_for_timeout(500)
    page.screenshot(path=str(Path(folder) / f"workflow_{name}.png"))


@pytest.mark.slow
@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_loads_without_dialog_and_queues_what_the_api_file_says(frontend, path):
    url, info, page = frontend
    workflow = json.loads(path.read_text())
    page.evaluate("async (w) => { await window.app.loadGraphData(w); }", workflow)
    page.wait_for_timeout(500)
    assert _dialogs(page) == [], path.name
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert _declared(prompt, info) == api_without_meta(api)
    if path.stem not in RUNNABLE:
        _screenshot(page, path.stem)
        return
    before = set(json.loads(page.evaluate(f"fetch('{url}/history').then(r => r.text())")))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        new = set(json.loads(page.evaluate(f"fetch('{url}/history').then(r => r.text())"))) - before
        if new:
            break
        page.wait_for_timeout(500)
    entry = wait_for_prompt(url, new.pop(), deadline)
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_timeout(1000)  # the front end handles the "executed" messages
    reports = page.evaluate(
        """() => window.app.graph._nodes.filter(n => n.type === 'PECBatchDiversity')
             .map(n => (n.widgets || []).find(w => w.name === 'pec_report')?.value ?? null)"""
    )
    assert reports and all(r and "Vendi (q=1)" in r and "raw features" in r for r in reports), reports
    assert _dialogs(page) == []
    _screenshot(page, path.stem)
