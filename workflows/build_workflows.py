"""Write the example workflows in both ComfyUI formats from one description.

    python workflows/build_workflows.py   # workflows/*.json (UI) and workflows/api/*.json (API)

The pictures in docs/ are screenshots of ComfyUI's front end (tests/test_frontend_browser.py).

Each graph is listed once below as nodes with their inputs (widget values, or links to another node's
output); the UI format (what ComfyUI's "Load" opens) and the API format (what ``POST /prompt`` takes)
are both derived from it, so they cannot disagree. The input order of the PEC nodes comes from their
specs; that of the few ComfyUI core nodes used is in ``CORE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comfy_pec.nodes.spec import WIDGET_TYPES  # noqa: E402 -- after the sys.path line that makes it importable

# ComfyUI core nodes: inputs (name, type[, control_after_generate]) in ComfyUI's order, outputs (name, type).
# The third item copies the input's ``control_after_generate`` option where ComfyUI declares one.
CORE = {
    "UNETLoader": ([("unet_name", "COMBO"), ("weight_dtype", "COMBO")], [("MODEL", "MODEL")]),
    "DualCLIPLoader": (
        [("clip_name1", "COMBO"), ("clip_name2", "COMBO"), ("type", "COMBO"), ("device", "COMBO")],
        [("CLIP", "CLIP")],
    ),
    "VAELoader": ([("vae_name", "COMBO")], [("VAE", "VAE")]),
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("text", "STRING"), ("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING"), ("guidance", "FLOAT")], [("CONDITIONING", "CONDITIONING")]),
    "BasicGuider": ([("model", "MODEL"), ("conditioning", "CONDITIONING")], [("GUIDER", "GUIDER")]),
    "CFGGuider": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("cfg", "FLOAT")],
        [("GUIDER", "GUIDER")],
    ),
    "BasicScheduler": (
        [("model", "MODEL"), ("scheduler", "COMBO"), ("steps", "INT"), ("denoise", "FLOAT")],
        [("SIGMAS", "SIGMAS")],
    ),
    "RandomNoise": ([("noise_seed", "INT", True)], [("NOISE", "NOISE")]),
    "KSamplerSelect": ([("sampler_name", "COMBO")], [("SAMPLER", "SAMPLER")]),
    "SamplerCustomAdvanced": (
        [
            ("noise", "NOISE"),
            ("guider", "GUIDER"),
            ("sampler", "SAMPLER"),
            ("sigmas", "SIGMAS"),
            ("latent_image", "LATENT"),
        ],
        [("output", "LATENT"), ("denoised_output", "LATENT")],
    ),
    "EmptySD3LatentImage": ([("width", "INT"), ("height", "INT"), ("batch_size", "INT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "STRING")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
    "EmptyImage": (
        [("width", "INT"), ("height", "INT"), ("batch_size", "INT"), ("color", "INT")],
        [("IMAGE", "IMAGE")],
    ),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
}

#: INT inputs that get a "control after generate" widget when their node does not say (the front end's
#: legacy convention, ComfyUI_frontend ``useIntWidget``).
SEED_NAMES = ("seed", "noise_seed")
CONTROL_DEFAULT = "fixed"  # saved value of those widgets: queueing the workflow keeps the seed


def node_io(class_type: str) -> tuple[list[tuple[str, str, bool | None]], list[tuple[str, str]]]:
    """(inputs, outputs) of a node class: inputs as (name, type, control_after_generate) with None
    where the node does not declare the option, outputs as (name, type)."""
    from comfy_pec.nodes.definitions import SPECS

    spec = next((s for s in SPECS if s.node_id == class_type), None)
    if spec is None:
        inputs, outputs = CORE[class_type]
        return [(*i, None) if len(i) == 2 else i for i in inputs], outputs
    return [(i.name, i.type, i.control_after_generate) for i in spec.inputs], [(o.name, o.type) for o in spec.outputs]


def is_widget(kind: str) -> bool:
    return kind in WIDGET_TYPES


def has_control_widget(name: str, kind: str, control_after_generate: bool | None) -> bool:
    """Whether the front end adds a "control after generate" widget (whose value the UI format saves
    right after the input's own) to this input: an INT declaring ``control_after_generate``, or, when
    it declares nothing, one named like a seed; a COMBO only when it declares it."""
    if kind == "INT":
        return name in SEED_NAMES if control_after_generate is None else control_after_generate
    return kind == "COMBO" and bool(control_after_generate)


@dataclass(frozen=True)
class Link:
    node: int
    slot: int = 0


@dataclass
class Node:
    """A node; ``pos`` is (column, y): :func:`layout` puts the column at ``column * COLUMN`` and moves
    the node down below the nodes above it in the same column."""

    id: int
    class_type: str
    inputs: dict
    pos: tuple[int, int]
    title: str = ""


@dataclass
class Workflow:
    name: str
    title: str
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)


# The front end's node metrics (LiteGraph): title bar above ``pos``, slot rows, widget rows.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, GAP = 30, 22, 26, 40
WIDTH, COLUMN = 340, 470
#: room for what a node shows after a run (image previews, text) or a multi-line text box.
SHOWN_HEIGHT = {
    "CLIPTextEncode": 90,
    "PreviewAny": 120,
    "PreviewImage": 260,
    "SaveImage": 260,
    "PECBatchDiversity": 560,
    "PECPerceptualEntropy": 420,
    "PECSelectDiverse": 110,
    "PECPerceptualEncoderLoader": 60,
}
WIDE = {"PECBatchDiversity": 420, "PECPerceptualEntropy": 420}


def node_size(class_type: str) -> tuple[int, int]:
    """Width and height (below the title bar) a node needs to show its slots, widgets and results."""
    inputs, outputs = node_io(class_type)
    sockets = [i for i in inputs if not is_widget(i[1])]
    widgets = sum(1 + has_control_widget(*i) for i in inputs if is_widget(i[1]))
    height = 10 + SLOT_HEIGHT * max(len(sockets), len(outputs)) + WIDGET_HEIGHT * widgets
    return WIDE.get(class_type, WIDTH), height + SHOWN_HEIGHT.get(class_type, 0)


def layout(workflow: Workflow) -> dict[int, tuple[int, int]]:
    """Positions without overlaps: nodes of a column keep their order from top to bottom and sit at
    least ``GAP`` below the one above (title bar included)."""
    placed: dict[int, tuple[int, int]] = {}
    bottom: dict[int, int] = {}
    for node in sorted(workflow.nodes, key=lambda n: n.pos):
        column, y = node.pos
        y = max(y, bottom.get(column, y))
        placed[node.id] = (column * COLUMN, y)
        bottom[column] = y + node_size(node.class_type)[1] + TITLE_HEIGHT + GAP
    return placed


def to_api(workflow: Workflow) -> dict:
    """The API format: ``{id: {"class_type", "inputs", "_meta"}}``; links are ``[source id, slot]``."""
    api = {}
    for node in workflow.nodes:
        inputs = {k: [str(v.node), v.slot] if isinstance(v, Link) else v for k, v in node.inputs.items()}
        api[str(node.id)] = {
            "class_type": node.class_type,
            "inputs": inputs,
            "_meta": {"title": node.title or node.class_type},
        }
    return api


def to_ui(workflow: Workflow) -> dict:
    """The UI (LiteGraph) format that ComfyUI's front end saves and loads: sockets in ``inputs``, the
    widget values in ``widgets_values`` in input order, each "control after generate" value right after
    its widget's (see :func:`has_control_widget`), links as ``[id, from, slot, to, slot, type]``."""
    links, ui_nodes = [], []
    by_id = {n.id: n for n in workflow.nodes}
    positions = layout(workflow)
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node in workflow.nodes:
        sockets = [n for n, t, _ in node_io(node.class_type)[0] if not is_widget(t)]
        for name in sockets:
            value = node.inputs.get(name)
            if isinstance(value, Link):
                link_id = len(links) + 1
                source_type = node_io(by_id[value.node].class_type)[1][value.slot][1]
                links.append([link_id, value.node, value.slot, node.id, sockets.index(name), source_type])
                outgoing.setdefault((value.node, value.slot), []).append(link_id)
    link_of = {(link[3], link[4]): link[0] for link in links}
    for order, node in enumerate(workflow.nodes):
        inputs, outputs = node_io(node.class_type)
        sockets = [(n, t) for n, t, _ in inputs if not is_widget(t)]
        widgets = []
        for name, kind, control in inputs:
            if is_widget(kind):
                widgets.append(node.inputs[name])
                if has_control_widget(name, kind, control):
                    widgets.append(CONTROL_DEFAULT)
        entry = {
            "id": node.id,
            "type": node.class_type,
            "pos": list(positions[node.id]),
            "size": list(node_size(node.class_type)),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link_of.get((node.id, i))} for i, (n, t) in enumerate(sockets)],
            "outputs": [
                {"name": n, "type": t, "links": outgoing.get((node.id, i), []), "slot_index": i}
                for i, (n, t) in enumerate(outputs)
            ],
            "properties": {"Node name for S&R": node.class_type},
            "widgets_values": widgets,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    return {
        "last_node_id": max(n.id for n in workflow.nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"pec": {"title": workflow.title, "notes": workflow.notes}},
        "version": 0.4,
    }


# ----------------------------------------------------------------------------- the workflows

PROMPT = "a red fox in a snowy forest at dawn, photograph"
NEGATIVE = "blurry, low quality"


def flux_lora_sde() -> Workflow:
    return Workflow(
        "pec_flux_lora_sde",
        "FLUX.1-dev + PEC LoRA + PEC Flow SDE Sampler",
        [
            Node(1, "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, (0, 0)),
            Node(
                2,
                "DualCLIPLoader",
                {
                    "clip_name1": "clip_l.safetensors",
                    "clip_name2": "t5xxl_fp16.safetensors",
                    "type": "flux",
                    "device": "default",
                },
                (0, 180),
            ),
            Node(3, "VAELoader", {"vae_name": "ae.safetensors"}, (0, 400)),
            Node(
                4,
                "PECLoraLoaderModelOnly",
                {
                    "model": Link(1),
                    "lora_name": "pec_flux_dev_pickscore.safetensors",
                    "strength_model": 1.0,
                    "allow_mismatch": False,
                },
                (1, 0),
            ),
            Node(5, "CLIPTextEncode", {"text": PROMPT, "clip": Link(2)}, (1, 220)),
            Node(6, "FluxGuidance", {"conditioning": Link(5), "guidance": 3.5}, (2, 220)),
            Node(7, "BasicGuider", {"model": Link(4), "conditioning": Link(6)}, (3, 0)),
            Node(8, "BasicScheduler", {"model": Link(4), "scheduler": "simple", "steps": 20, "denoise": 1.0}, (3, 140)),
            Node(9, "RandomNoise", {"noise_seed": 42}, (2, 400)),
            Node(
                10,
                "PECFlowSDESampler",
                {
                    "method": "flow_sde",
                    "noise_level": 0.9,
                    "window": "sigmas",
                    "window_start": 0,
                    "window_count": 2,
                    "sigma_high": 1.0,
                    "sigma_low": 0.5,
                },
                (2, 540),
            ),
            Node(11, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (1, 540)),
            Node(
                12,
                "SamplerCustomAdvanced",
                {"noise": Link(9), "guider": Link(7), "sampler": Link(10), "sigmas": Link(8), "latent_image": Link(11)},
                (3, 330),
            ),
            Node(13, "VAEDecode", {"samples": Link(12), "vae": Link(3)}, (4, 330)),
            Node(14, "SaveImage", {"images": Link(13), "filename_prefix": "PEC_flux"}, (5, 330)),
            Node(15, "PreviewAny", {"source": Link(4, 1)}, (4, 0), "LoRA summary"),
        ],
        [
            "Put a PEC LoRA trained on FLUX.1-dev in models/loras.",
            "The SDE runs while sigma is between 0.5 and 1 (the layout of the image), Euler after.",
        ],
    )


@dataclass(frozen=True)
class Base:
    """The model a workflow samples with: its loader node (outputs MODEL, CLIP, VAE) and settings."""

    suffix: str  # of the workflow name
    loader: str
    loader_inputs: dict
    prompt: str
    negative: str
    latent_side: int  # EmptySD3LatentImage width/height
    steps: int
    cfg: float
    encoder: str
    lora: str
    repeats: int  # PEC Perceptual Entropy draws
    notes: tuple[str, ...]


SD35 = Base(
    "",
    "CheckpointLoaderSimple",
    {"ckpt_name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"},
    PROMPT,
    NEGATIVE,
    1024,
    28,
    4.5,
    "dinov2-small",
    "pec_sd35m_pickscore.safetensors",
    8,
    (
        "Put facebook/dinov2-small (config.json + weights) in models/pec_encoders/dinov2-small,",
        "or connect a CLIP Vision Loader to the encoder loader's clip_vision input.",
    ),
)
EMBEDDED = Base(
    "_embedded",
    "PECEmbeddedModelLoader",
    {},
    "a red circle",
    "",
    128,
    10,
    3.0,
    "toy (embedded)",
    "pec_demo.safetensors",
    4,
    (
        "The embedded tiny model and toy encoder: no download, seconds on a CPU (64x64 images from a",
        "128x128 latent node: the tiny VAE downscales by 4). For SD3.5 use the workflow without _embedded.",
    ),
)
DEMO_LORA_NOTE = "LoRA: run `pec demo` and copy runs/demo/pec/lora.safetensors to models/loras/pec_demo.safetensors."


def _sampling(base: Base, first_id: int, model: Link, y: int) -> list[Node]:
    """Sampling of the latent batch of node 4 with the prompts of nodes 2/3, sampler 5 and noise 6."""
    i = first_id
    return [
        Node(i, "CFGGuider", {"model": model, "positive": Link(2), "negative": Link(3), "cfg": base.cfg}, (2, y)),
        Node(
            i + 1,
            "BasicScheduler",
            {"model": model, "scheduler": "simple", "steps": base.steps, "denoise": 1.0},
            (2, y + 170),
        ),
        Node(
            i + 2,
            "SamplerCustomAdvanced",
            {"noise": Link(6), "guider": Link(i), "sampler": Link(5), "sigmas": Link(i + 1), "latent_image": Link(4)},
            (3, y),
        ),
        Node(i + 3, "VAEDecode", {"samples": Link(i + 2), "vae": Link(1, 2)}, (4, y)),
    ]


def _inputs(base: Base, batch: int) -> list[Node]:
    side = base.latent_side
    return [
        Node(1, base.loader, dict(base.loader_inputs), (0, 0)),
        Node(2, "CLIPTextEncode", {"text": base.prompt, "clip": Link(1, 1)}, (1, 0), "positive"),
        Node(3, "CLIPTextEncode", {"text": base.negative, "clip": Link(1, 1)}, (1, 220), "negative"),
        Node(4, "EmptySD3LatentImage", {"width": side, "height": side, "batch_size": batch}, (0, 200)),
        Node(5, "KSamplerSelect", {"sampler_name": "euler"}, (0, 380)),
        Node(6, "RandomNoise", {"noise_seed": 7}, (0, 480)),
        Node(7, "PECPerceptualEncoderLoader", {"model": base.encoder, "encoder_type": "auto"}, (0, 600)),
    ]


def batch_diversity(base: Base = SD35) -> Workflow:
    nodes = (
        _inputs(base, 8)
        + _sampling(base, 10, Link(1), 0)
        + [
            Node(20, "PECBatchDiversity", {"images": Link(13), "encoder": Link(7), "q": 1.0, "group_size": 0}, (5, 0)),
            Node(21, "PECSelectDiverse", {"images": Link(13), "encoder": Link(7), "k": 4, "q": 1.0}, (5, 810)),
            Node(22, "SaveImage", {"images": Link(21), "filename_prefix": "PEC_diverse4"}, (6, 810)),
            Node(
                23,
                "PECPerceptualEntropy",
                {
                    "guider": Link(10),
                    "sigmas": Link(11),
                    "latent_image": Link(4),
                    "noise_seed": 7,
                    "vae": Link(1, 2),
                    "encoder": Link(7),
                    "step": 4,
                    "method": "flow_sde",
                    "noise_level": 0.7,
                    "repeats": base.repeats,
                    "decode": "noisy",
                },
                (3, 420),
            ),
        ]
    )
    return Workflow(
        "pec_batch_diversity" + base.suffix,
        "Generate a batch, score its diversity, keep the 4 most diverse",
        nodes,
        [
            *base.notes,
            "PEC Perceptual Entropy probes step 4: how far one Flow-SDE step moves the image perceptually.",
        ],
    )


def lora_on_off(base: Base = SD35) -> Workflow:
    nodes = _inputs(base, 8) + [
        Node(
            8,
            "PECLoraLoaderModelOnly",
            {"model": Link(1), "lora_name": base.lora, "strength_model": 1.0, "allow_mismatch": False},
            (1, 420),
        ),
        *_sampling(base, 10, Link(1), 0),
        *_sampling(base, 30, Link(8), 810),
        Node(
            20,
            "PECBatchDiversity",
            {"images": Link(13), "encoder": Link(7), "q": 1.0, "group_size": 0},
            (5, 0),
            "base model",
        ),
        Node(
            21,
            "PECBatchDiversity",
            {"images": Link(33), "encoder": Link(7), "q": 1.0, "group_size": 0},
            (5, 810),
            "with PEC LoRA",
        ),
        Node(22, "PreviewImage", {"images": Link(13)}, (6, 0), "base model"),
        Node(23, "PreviewImage", {"images": Link(33)}, (6, 810), "with PEC LoRA"),
    ]
    return Workflow(
        "pec_lora_on_off" + base.suffix,
        "The same prompt and seeds with the LoRA off and on, both scored",
        nodes,
        [
            *base.notes,
            *([DEMO_LORA_NOTE] if base is EMBEDDED else []),
            "Both branches share prompt, seed and sampler: the only difference is the LoRA.",
            "Compare the two Vendi scores (higher = more distinct images among the 8).",
        ],
    )


def lora_sde_embedded() -> Workflow:
    """The FLUX workflow's graph (PEC LoRA, PEC Flow SDE Sampler) on the embedded model, scored."""
    nodes = _inputs(EMBEDDED, 4) + [
        Node(
            8,
            "PECLoraLoaderModelOnly",
            {"model": Link(1), "lora_name": EMBEDDED.lora, "strength_model": 1.0, "allow_mismatch": False},
            (1, 420),
        ),
        Node(
            9,
            "PECFlowSDESampler",
            {
                "method": "flow_sde",
                "noise_level": 0.7,
                "window": "sigmas",
                "window_start": 0,
                "window_count": 2,
                "sigma_high": 1.0,
                "sigma_low": 0.5,
            },
            (1, 760),
        ),
        Node(
            10, "CFGGuider", {"model": Link(8), "positive": Link(2), "negative": Link(3), "cfg": EMBEDDED.cfg}, (2, 0)
        ),
        Node(
            11,
            "BasicScheduler",
            {"model": Link(8), "scheduler": "simple", "steps": EMBEDDED.steps, "denoise": 1.0},
            (2, 170),
        ),
        Node(
            12,
            "SamplerCustomAdvanced",
            {"noise": Link(6), "guider": Link(10), "sampler": Link(9), "sigmas": Link(11), "latent_image": Link(4)},
            (3, 0),
        ),
        Node(13, "VAEDecode", {"samples": Link(12), "vae": Link(1, 2)}, (4, 0)),
        Node(14, "SaveImage", {"images": Link(13), "filename_prefix": "PEC_embedded_sde"}, (5, 810)),
        Node(15, "PreviewAny", {"source": Link(8, 1)}, (2, 420), "LoRA summary"),
        Node(16, "PECBatchDiversity", {"images": Link(13), "encoder": Link(7), "q": 1.0, "group_size": 0}, (5, 0)),
    ]
    return Workflow(
        "pec_lora_sde_embedded",
        "Embedded model + PEC LoRA + PEC Flow SDE Sampler, scored (the FLUX workflow's graph on a CPU)",
        nodes,
        [*EMBEDDED.notes, DEMO_LORA_NOTE, "The SDE runs while sigma is between 0.5 and 1, Euler after."],
    )


def score_images_demo() -> Workflow:
    colours = [0xD03030, 0xD03030, 0x30A040, 0x3050D0]
    nodes = [
        Node(i + 1, "EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": c}, (0, 140 * i))
        for i, c in enumerate(colours)
    ]
    nodes += [
        Node(5, "ImageBatch", {"image1": Link(1), "image2": Link(2)}, (1, 0)),
        Node(6, "ImageBatch", {"image1": Link(5), "image2": Link(3)}, (1, 140)),
        Node(7, "ImageBatch", {"image1": Link(6), "image2": Link(4)}, (1, 280)),
        Node(8, "PECPerceptualEncoderLoader", {"model": "toy (embedded)", "encoder_type": "auto"}, (1, 440)),
        Node(9, "PECBatchDiversity", {"images": Link(7), "encoder": Link(8), "q": 1.0, "group_size": 0}, (2, 0)),
        Node(10, "PECSelectDiverse", {"images": Link(7), "encoder": Link(8), "k": 3, "q": 1.0}, (2, 810)),
        Node(11, "PreviewImage", {"images": Link(10)}, (3, 810)),
    ]
    return Workflow(
        "pec_score_images_demo",
        "Score a batch without any model download (toy encoder)",
        nodes,
        ["Four solid images, two of them the same red: Vendi is below 4 and Select Diverse drops a duplicate."],
    )


WORKFLOWS = [
    flux_lora_sde,
    lora_sde_embedded,
    batch_diversity,
    partial(batch_diversity, EMBEDDED),
    lora_on_off,
    partial(lora_on_off, EMBEDDED),
    score_images_demo,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    folder = ROOT / "workflows"
    (folder / "api").mkdir(exist_ok=True)
    for make in WORKFLOWS:
        workflow = make()
        (folder / f"{workflow.name}.json").write_text(json.dumps(to_ui(workflow), indent=1) + "\n")
        (folder / "api" / f"{workflow.name}.json").write_text(json.dumps(to_api(workflow), indent=1) + "\n")
        print(workflow.name)


if __name__ == "__main__":
    main()
