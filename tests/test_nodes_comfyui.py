"""The node pack inside real ComfyUI ($COMFYUI_PATH), on the CPU, with tiny models: the pack loads
through ComfyUI's own custom-node loader, the sampler reproduces Euler and the library step, the LoRA
loader checks and patches, the diversity and entropy nodes score what the library scores."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import tiny_models as tm
import torch
from comfy_server import comfyui_server, run_prompt

from comfy_pec.diversity import vendi_score
from comfy_pec.flow_sampler import noise_generator
from comfy_pec.lora_format import save_lora
from comfy_pec.sde import flow_sde_step

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[1]
PEC_IDS = [
    "PECLoraLoader",
    "PECLoraLoaderModelOnly",
    "PECFlowSDESampler",
    "PECPerceptualEncoderLoader",
    "PECBatchDiversity",
    "PECSelectDiverse",
    "PECPerceptualEntropy",
    "PECEmbeddedModelLoader",
]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI imported from $COMFYUI_PATH on the CPU, its folders in a temp dir, the pack loaded by
    ComfyUI's custom-node loader from a link named like a ComfyUI-Manager install."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA here
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import folder_paths
    import nodes

    base = tmp_path_factory.mktemp("comfy")
    for kind in ("temp", "output", "input"):
        (base / kind).mkdir()
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_output_directory(str(base / "output"))
    (base / "loras").mkdir()
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-PEC").symlink_to(REPO, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / "ComfyUI-PEC")))
    return comfy, nodes, folder_paths, base


@pytest.fixture(scope="module")
def sd3(comfy):
    """A tiny SD3 ModelPatcher, conditioning for it, and an empty latent."""
    comfy_mod = comfy[0]
    model = comfy_mod.sd.load_diffusion_model_state_dict(
        tm.tiny_sd3_transformer().state_dict(), model_options={"dtype": torch.float32}
    )
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 8, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]]
    return model, cond, torch.zeros(2, 16, 8, 8)


def node(comfy, node_id):
    return comfy[1].NODE_CLASS_MAPPINGS[node_id]


def run(comfy, node_id, **inputs):
    """Execute a node the way ComfyUI's executor does for a V3 node (outputs as a tuple)."""
    return tuple(node(comfy, node_id).execute(**inputs).args)


def pec_sampler(comfy, noise_level, **window):
    settings = (
        dict(
            method="flow_sde",
            noise_level=noise_level,
            window="all",
            window_start=0,
            window_count=2,
            sigma_high=1.0,
            sigma_low=0.0,
        )
        | window
    )
    return run(comfy, "PECFlowSDESampler", **settings)[0]


def sample(comfy, sd3, sampler, sigmas, seed=5, callback=None):
    model, cond, latent = sd3
    noise = comfy[0].sample.prepare_noise(latent, seed)
    return comfy[0].sample.sample_custom(
        model, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=seed, callback=callback, disable_pbar=True
    )


def test_pack_loads_as_v3_nodes_and_lists_every_node(comfy):
    from comfy_api.latest import io

    for node_id in PEC_IDS:
        cls = node(comfy, node_id)
        assert issubclass(cls, io.ComfyNode)
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == node_id and info["category"].startswith("PEC/")
    assert comfy[1].NODE_DISPLAY_NAME_MAPPINGS["PECFlowSDESampler"] == "PEC Flow SDE Sampler"


def test_noise_level_zero_reproduces_comfyuis_euler(comfy, sd3):
    sigmas = comfy[0].samplers.calculate_sigmas(sd3[0].get_model_object("model_sampling"), "simple", 6)
    ours = sample(comfy, sd3, pec_sampler(comfy, 0.0), sigmas)
    euler = sample(comfy, sd3, comfy[0].samplers.sampler_object("euler"), sigmas)
    assert (ours - euler).abs().max() <= 1e-5


def test_same_seed_same_latents_and_first_step_is_flow_sde_step(comfy, sd3):
    sigmas = comfy[0].samplers.calculate_sigmas(sd3[0].get_model_object("model_sampling"), "simple", 4)
    seen = {}
    sampler = pec_sampler(comfy, 0.7)
    a = sample(comfy, sd3, sampler, sigmas, callback=lambda i, den, x, total: seen.setdefault(i, (den, x)))
    b = sample(comfy, sd3, sampler, sigmas)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(comfy, sd3, sampler, sigmas, seed=6))
    (den0, x0), (_, x1) = seen[0], seen[1]
    v0 = (x0 - den0) / sigmas[0]
    noise = torch.randn(x0.shape, generator=noise_generator(5))
    expected = flow_sde_step(x0, v0, sigmas[0], sigmas[1], 0.7, noise=noise).x_next
    assert torch.allclose(x1, expected, atol=1e-6)


def test_sampler_refuses_a_model_that_is_not_a_flow_model(comfy, sd3):
    model_sampling = comfy[0].model_sampling

    class EpsSampling(model_sampling.ModelSamplingDiscrete, model_sampling.EPS):
        pass

    eps_model = sd3[0].clone()
    eps_model.add_object_patch("model_sampling", EpsSampling())
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(Exception, match="needs a flow-matching model"):
        sample(comfy, (eps_model, *sd3[1:]), pec_sampler(comfy, 0.7), sigmas)


@pytest.fixture(scope="module")
def loras(comfy):
    """In the loras folder: an SD3 PEC LoRA on two attention projections (+ one module the model lacks),
    the same declared for FLUX, and a file that is no LoRA."""
    folder = comfy[3] / "loras"
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_k", "not_in_model.proj"):
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(2, 128, generator=gen)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(128, 2, generator=gen)
    provenance = {"method": "pec", "beta": 0.05}
    save_lora(
        tensors,
        folder / "pec_sd3.safetensors",
        alpha=2,
        dtype=torch.float32,
        architecture="sd3",
        provenance=provenance,
        base_model="tiny/sd3",
    )
    save_lora(tensors, folder / "pec_flux.safetensors", alpha=2, dtype=torch.float32, architecture="flux")
    (folder / "notes.safetensors").write_text("this is not a LoRA")


def test_lora_loader_checks_reports_and_patches(comfy, sd3, loras):
    model = sd3[0]
    patched, summary = run(
        comfy,
        "PECLoraLoaderModelOnly",
        model=model,
        lora_name="pec_sd3.safetensors",
        strength_model=1.0,
        allow_mismatch=False,
    )
    assert "2 of 3 modules matched" in summary and "β=0.05" in summary and "tiny/sd3" in summary
    # Both matched modules patch a slice of ComfyUI's fused qkv weights (test_lora_format checks the values).
    assert sorted(patched.patches) == [f"diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in (0, 1)]
    with pytest.raises(Exception, match="for FLUX models but the model is sd3"):
        run(
            comfy,
            "PECLoraLoaderModelOnly",
            model=model,
            lora_name="pec_flux.safetensors",
            strength_model=1.0,
            allow_mismatch=False,
        )
    _, summary = run(
        comfy,
        "PECLoraLoaderModelOnly",
        model=model,
        lora_name="pec_flux.safetensors",
        strength_model=1.0,
        allow_mismatch=True,
    )
    assert "WARNING" in summary
    with pytest.raises(Exception, match="notes.safetensors: not a safetensors file") as err:
        run(
            comfy,
            "PECLoraLoaderModelOnly",
            model=model,
            lora_name="notes.safetensors",
            strength_model=1.0,
            allow_mismatch=False,
        )
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def encoder(comfy):
    (encoder,) = run(comfy, "PECPerceptualEncoderLoader", model="toy (embedded)", encoder_type="auto")
    return encoder


def test_diversity_node_scores_like_the_library_and_shows_a_heatmap(comfy, encoder):
    images = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    output = node(comfy, "PECBatchDiversity").execute(images=[images], encoder=[encoder], q=[1.0], group_size=[0])
    vendi, _, _, report, heatmap = output.args
    assert vendi == pytest.approx(float(vendi_score(encoder(images))), rel=1e-5)
    assert heatmap.shape[0] == 1 and "Vendi (q=1)" in report
    assert output.ui["images"] and output.ui["text"] == (report,)
    one = node(comfy, "PECBatchDiversity").execute(images=[images[:1]], encoder=[encoder], q=[1.0], group_size=[0])
    assert one.args[0] == 1.0 and "note: one image" in one.args[3]
    picked, indices, _ = (
        node(comfy, "PECSelectDiverse").execute(images=[images], encoder=[encoder], k=[2], q=[1.0]).args
    )
    assert picked.shape == (2, 32, 32, 3) and len(indices.split(",")) == 2


def test_perceptual_entropy_node_probes_one_step(comfy, sd3, encoder):
    model, cond, latent = sd3
    guider = comfy[0].samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)

    class TinyVae:  # decodes the first three latent channels to an image (the node only calls decode)
        def decode(self, samples):
            return torch.sigmoid(samples[:, :3]).movedim(1, -1)

    sigmas = comfy[0].samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 6)
    probe = dict(
        guider=guider,
        sigmas=sigmas,
        latent_image={"samples": latent},
        noise_seed=3,
        vae=TinyVae(),
        encoder=encoder,
        step=2,
        method="flow_sde",
        noise_level=0.7,
        repeats=4,
    )
    entropy, energy, vendi, report, draws = run(comfy, "PECPerceptualEntropy", **probe, decode="noisy")
    assert draws.shape == (4 * 2, 8, 8, 3)
    assert energy > 0 and 1.0 <= vendi <= 4.0 and "step 2" in report
    again = run(comfy, "PECPerceptualEntropy", **probe, decode="x0")
    assert again[0] != entropy


# ----------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def embedded(comfy):
    """MODEL, CLIP, VAE from PEC Embedded Model Loader."""
    return run(comfy, "PECEmbeddedModelLoader")


def write_demo_lora(path: Path) -> Path:
    """A LoRA on the embedded transformer written by the trainer's writer (what `pec demo` saves), with
    random B so that it visibly changes images."""
    from diffusers import SD3Transformer2DModel

    from comfy_pec.nodes.embedded import embedded_folder

    transformer = SD3Transformer2DModel.from_pretrained(str(embedded_folder() / "transformer"))
    tm.add_random_lora(transformer, r=4, alpha=4, seed=3)
    save_lora(transformer, path, dtype=torch.float32, architecture="sd3", base_model="embedded")
    return path


@pytest.fixture(scope="module")
def demo_lora(comfy):
    return write_demo_lora(comfy[3] / "loras" / "pec_demo.safetensors")


def _pec_sample(lora=None, seed=0):
    """What `pec sample [--lora]` draws for one prompt and seed (ODE), as an IMAGE [1, 64, 64, 3]."""
    from trainer.backends import EMBEDDED_MODEL, load_backend
    from trainer.sampling import sample_images

    backend = load_backend(EMBEDDED_MODEL)
    if lora is not None:
        backend.load_lora(str(lora))
    images = sample_images(backend, ["a red circle"], [seed], sde="flow_sde", noise_level=0.0, progress=False)
    return images.movedim(1, -1)


def _comfy_sample(comfy, embedded, model=None, sampler="euler", seed=0):
    """KSampler-style sampling (10 steps, simple schedule, CFG 3, 128x128 SD3 latent) and VAEDecode."""
    nodes = comfy[1]
    model = embedded[0] if model is None else model
    encode = nodes.CLIPTextEncode()
    positive, negative = encode.encode(embedded[1], "a red circle")[0], encode.encode(embedded[1], "")[0]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    if sampler == "euler":
        out = nodes.common_ksampler(model, seed, 10, 3.0, "euler", "simple", positive, negative, latent)[0]
    else:
        sigmas = comfy[0].samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
        noise = comfy[0].sample.prepare_noise(latent["samples"], seed)
        samples = comfy[0].sample.sample_custom(
            model, noise, 3.0, sampler, sigmas, positive, negative, latent["samples"], seed=seed, disable_pbar=True
        )
        out = {"samples": samples}
    return nodes.VAEDecode().decode(embedded[2], out)[0]


# Same float32 arithmetic in another order (ComfyUI's fused qkv and attention vs diffusers' separate
# projections): 3e-6 measured on [0, 1] pixels; 1e-4 leaves margin and is 40x below one 8-bit level.
PIXEL_TOLERANCE = 1e-4


def test_embedded_model_is_comfyuis_sd3_and_reproduces_pec_sample(comfy, embedded):
    model, clip, vae = embedded
    assert type(model.model).__name__ == "SD3" and model.get_model_object("model_sampling").shift == 1.0
    image = _comfy_sample(comfy, embedded)
    assert image.shape == (1, 64, 64, 3)
    assert (image - _pec_sample()).abs().max() <= PIXEL_TOLERANCE


def test_demo_lora_through_stock_and_pec_loaders_reproduces_pec_sample_lora(comfy, embedded, demo_lora):
    reference = _pec_sample(demo_lora)
    assert (reference - _pec_sample()).abs().max() > 0.05  # the LoRA changes the image
    stock = comfy[1].LoraLoaderModelOnly().load_lora_model_only(embedded[0], demo_lora.name, 1.0)[0]
    pec, summary = run(
        comfy,
        "PECLoraLoaderModelOnly",
        model=embedded[0],
        lora_name=demo_lora.name,
        strength_model=1.0,
        allow_mismatch=False,
    )
    assert "modules matched" in summary and " 0 of" not in summary
    with_clip, clip, _ = run(
        comfy,
        "PECLoraLoader",
        model=embedded[0],
        clip=embedded[1],
        lora_name=demo_lora.name,
        strength_model=1.0,
        strength_clip=1.0,
        allow_mismatch=False,
    )
    assert clip is embedded[1]  # the wrapped text encoders take no patches (PEC LoRAs train none)
    for patched in (stock, pec, with_clip):
        assert (_comfy_sample(comfy, embedded, patched) - reference).abs().max() <= PIXEL_TOLERANCE


def test_pec_sampler_at_noise_zero_is_euler_and_a_seed_repeats_on_the_embedded_model(comfy, embedded):
    euler = _comfy_sample(comfy, embedded)
    ode = _comfy_sample(comfy, embedded, sampler=pec_sampler(comfy, 0.0))
    assert (ode - euler).abs().max() <= 1e-5
    sde = [_comfy_sample(comfy, embedded, sampler=pec_sampler(comfy, 0.7), seed=4) for _ in range(2)]
    assert torch.equal(sde[0], sde[1]) and (sde[0] - euler).abs().max() > 0.01


# ----------------------------------------------------------------------------- headless server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI's main.py on the CPU (tests/comfy_server.py), with a temp base directory holding the pack,
    a tiny SD3 diffusion model and three LoRA files (one not a LoRA)."""
    base = tmp_path_factory.mktemp("headless")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    (base / "models" / "loras").mkdir()
    state = {k: v.contiguous() for k, v in tm.tiny_sd3_transformer().state_dict().items()}
    safetensors.torch.save_file(state, str(base / "models" / "diffusion_models" / "tiny_sd3.safetensors"))
    gen = torch.Generator().manual_seed(1)
    lora = {
        f"transformer.transformer_blocks.0.attn.to_q.lora_{ab}.weight": torch.randn(*shape, generator=gen)
        for ab, shape in (("A", (2, 128)), ("B", (128, 2)))
    }
    save_lora(lora, base / "models" / "loras" / "tiny.safetensors", alpha=2, dtype=torch.float32, architecture="sd3")
    (base / "models" / "loras" / "notes.safetensors").write_text("this is not a LoRA")
    write_demo_lora(base / "models" / "loras" / "pec_demo.safetensors")
    with comfyui_server(base, real_frontend=False) as running:
        yield running


@pytest.mark.slow
def test_headless_comfyui_lists_the_nodes_and_runs_the_workflows(server):
    url, info = server
    assert set(PEC_IDS) <= set(info)
    assert info["PECBatchDiversity"]["output_node"] and info["PECFlowSDESampler"]["category"] == "PEC/sampling"
    deadline = time.monotonic() + 600

    demo = json.loads((REPO / "workflows" / "api" / "pec_score_images_demo.json").read_text())
    entry = run_prompt(url, demo, deadline)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"]["9"]["text"][0]
    assert "4 images" in report and "Vendi (q=1)" in report and entry["outputs"]["9"]["images"]
    assert len(entry["outputs"]["11"]["images"]) == 3

    lora_graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "2": {
            "class_type": "PECLoraLoaderModelOnly",
            "inputs": {
                "model": ["1", 0],
                "lora_name": "tiny.safetensors",
                "strength_model": 1.0,
                "allow_mismatch": False,
            },
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = run_prompt(url, lora_graph, deadline)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "1 of 1 modules matched" in entry["outputs"]["3"]["text"][0]

    lora_graph["2"]["inputs"]["lora_name"] = "notes.safetensors"
    entry = run_prompt(url, lora_graph, deadline)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors
    assert errors[0]["node_id"] == "2" and "not a safetensors file" in errors[0]["exception_message"]


EMBEDDED_WORKFLOWS = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json") if "embedded" in p.stem)
WEIGHT_INPUTS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "vae_name", "lora_name", "model"}


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED_WORKFLOWS)
def test_every_embedded_workflow_runs_through_the_server(server, name):
    url, _ = server
    prompt = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    start = time.monotonic()
    entry = run_prompt(url, prompt, start + 600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    print(f"{name}: {time.monotonic() - start:.1f} s")
    outputs = entry["outputs"]
    for node_id, node in prompt.items():
        if node["class_type"] == "PECBatchDiversity":
            report = outputs[node_id]["text"][0]
            assert "Vendi (q=1)" in report and "raw features" in report and "normalised features" in report
            assert outputs[node_id]["images"]  # the heatmap
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            assert outputs[node_id]["images"]
        if node["class_type"] == "PECPerceptualEntropy":
            assert "perceptual entropy H_A" in outputs[node_id]["text"][0]
        if node["class_type"] == "PreviewAny":
            assert "modules matched" in outputs[node_id]["text"][0]


def test_workflows_for_large_models_fail_only_on_missing_weight_files(server):
    url, _ = server
    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        if "embedded" in path.stem or path.stem == "pec_score_images_demo":
            continue
        body = json.dumps({"prompt": json.loads(path.read_text())}).encode()
        request = urllib.request.Request(f"{url}/prompt", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        errors = json.loads(refused.value.read())["node_errors"]
        found = [(e["type"], e["extra_info"]["input_name"]) for node in errors.values() for e in node["errors"]]
        assert found and all(kind == "value_not_in_list" and name in WEIGHT_INPUTS for kind, name in found), found


def test_ui_workflows_map_to_the_api_files_with_the_servers_node_definitions(server):
    from comfy_frontend import api_without_meta, frontend_prompt

    _, info = server
    for path in sorted((REPO / "workflows").glob("*.json")):
        ui = json.loads(path.read_text())
        api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
        assert frontend_prompt(ui, info) == api_without_meta(api), path.name
