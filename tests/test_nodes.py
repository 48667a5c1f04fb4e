"""The functions under the ComfyUI nodes, without ComfyUI: the Flow-SDE sampler loop and its probe,
batch diversity, the LoRA checks, the encoder sources, and the node registry's V1 fallback."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_pec import PECError
from comfy_pec.batch import (
    ONE_IMAGE_NOTE,
    concat_images,
    diversity_of,
    embed_images,
    probe_entropy,
    similarity_heatmap,
)
from comfy_pec.diversity import (
    feature_variance,
    mean_pairwise_distance,
    vendi_score,
)
from comfy_pec.encoders import load_encoder
from comfy_pec.flow_sampler import noise_generator, probe_step, sample_flow
from comfy_pec.lora_format import LoraInfo, lora_key_coverage
from comfy_pec.nodes import NODE_CLASS_MAPPINGS, SPECS
from comfy_pec.nodes.lora_check import check_lora, lora_family, model_family
from comfy_pec.nodes.perceptual import (
    ClipVisionEncoder,
    guess_encoder_name,
    list_encoder_entries,
    load_from_folder,
)
from comfy_pec.nodes.registry import build_nodes
from comfy_pec.perceptual import perceptual_entropy
from comfy_pec.sde import cps_step, flow_sde_step, ode_step, sd3_schedule, stochastic_steps

ROOT = Path(__file__).resolve().parent.parent


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear x̂0(x, σ) standing in for a network (ComfyUI's denoiser convention)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * x.roll(1, dims=-1)


@pytest.fixture
def latent():
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- sampler


def test_noise_level_zero_is_the_euler_sampler(latent):
    sigmas = sd3_schedule(8)
    x = latent.clone()
    for i in range(8):  # ComfyUI's Euler: d = (x - x̂0)/σ, x += d·(σ' - σ)
        d = (x - toy_denoiser(x, sigmas[i].expand(2))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    out = sample_flow(toy_denoiser, latent, sigmas, noise_level=0.0, seed=1)
    assert torch.allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_same_seed_same_latent_other_seed_other_latent(latent, method):
    sigmas = sd3_schedule(6)
    a = sample_flow(toy_denoiser, latent, sigmas, method=method, noise_level=0.7, seed=11)
    b = sample_flow(toy_denoiser, latent, sigmas, method=method, noise_level=0.7, seed=11)
    c = sample_flow(toy_denoiser, latent, sigmas, method=method, noise_level=0.7, seed=12)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("method, step", [("flow_sde", flow_sde_step), ("cps", cps_step)])
def test_one_step_is_the_library_step(latent, method, step):
    sigmas = torch.tensor([1.0, 0.8, 0.0])  # step 0 stochastic (from σ = 1), step 1 always ODE
    seen = []
    sample_flow(
        toy_denoiser, latent, sigmas, method=method, noise_level=0.7, seed=5, callback=lambda i, den, x: seen.append(x)
    )
    v = (latent - toy_denoiser(latent, torch.ones(2))) / 1.0
    noise = torch.randn(latent.shape, generator=noise_generator(5))
    expected = step(latent, v, 1.0, 0.8, 0.7, noise=noise).x_next
    assert torch.equal(seen[1], expected)


def test_step_noise_is_not_the_initial_noise_stream():
    initial = torch.randn(16, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(torch.randn(16, generator=noise_generator(7)), initial)


def test_sde_window_modes():
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.0])
    assert stochastic_steps("all", sigmas).tolist() == [True, True, True, True, False]
    assert stochastic_steps("steps", sigmas, start=1, size=2).tolist() == [False, True, True, False, False]
    assert stochastic_steps("steps", sigmas, start=3, size=9).tolist() == [False, False, False, True, False]
    assert stochastic_steps("sigmas", sigmas, sigma_high=0.9, sigma_low=0.5).tolist() == [
        False,
        True,
        True,
        True,
        False,
    ]
    with pytest.raises(PECError, match="sigma_low"):
        stochastic_steps("sigmas", sigmas, sigma_high=0.2, sigma_low=0.5)
    with pytest.raises(PECError, match="unknown SDE window"):
        stochastic_steps("some", sigmas)


def test_window_outside_is_euler(latent):
    sigmas = sd3_schedule(5)
    mask = torch.zeros(5, dtype=torch.bool)
    sde = sample_flow(toy_denoiser, latent, sigmas, noise_level=0.9, sde_mask=mask, seed=3)
    assert torch.allclose(sde, sample_flow(toy_denoiser, latent, sigmas, noise_level=0.0), atol=1e-6)


def test_probe_step_draws_the_library_step(latent):
    sigmas = sd3_schedule(6)
    found = probe_step(toy_denoiser, latent, sigmas, step=2, repeats=3, noise_level=0.7, seed=4)
    x = latent
    for i in range(2):
        x = ode_step(x, (x - toy_denoiser(x, sigmas[i].expand(2))) / sigmas[i], sigmas[i], sigmas[i + 1]).x_next
    v = (x - toy_denoiser(x, sigmas[2].expand(2))) / sigmas[2]
    gen = noise_generator(4)
    draws = [
        flow_sde_step(x, v, sigmas[2], sigmas[3], 0.7, noise=torch.randn(x.shape, generator=gen)) for _ in range(3)
    ]
    assert found.samples.shape == (3, *latent.shape)
    assert torch.allclose(found.samples, torch.stack([d.x_next for d in draws]), atol=1e-6)
    assert torch.allclose(found.mean, draws[0].mean, atol=1e-6)
    assert found.std == pytest.approx(float(draws[0].std))
    assert found.sample_targets is found.samples
    clean = probe_step(toy_denoiser, latent, sigmas, step=2, repeats=3, noise_level=0.7, seed=4, decode="x0")
    assert torch.allclose(clean.sample_targets[1], toy_denoiser(found.samples[1], sigmas[3].expand(2)), atol=1e-6)
    with pytest.raises(PECError, match="probe step"):
        probe_step(toy_denoiser, latent, sigmas, step=5)


# ----------------------------------------------------------------------------- diversity


@pytest.fixture(scope="module")
def toy_encoder():
    return load_encoder("toy")


def _images(n: int, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *size, 3, generator=torch.Generator().manual_seed(seed))


def test_vendi_of_the_node_is_vendi_score_and_both_variances_are_reported(toy_encoder):
    images = _images(6)
    features, notes = embed_images(toy_encoder, images, batch_size=4, raw=True)
    result = diversity_of(features)
    raw, normalised = toy_encoder.features(images), toy_encoder(images)
    assert notes == [] and result.count == 6
    assert result.vendi == pytest.approx(float(vendi_score(normalised)), rel=1e-5)
    # the paper's figure: tr(Cov) of the raw features, not of the unit vectors
    assert result.variance == pytest.approx(float(feature_variance(raw)), rel=1e-5)
    assert abs(result.variance - float(feature_variance(normalised))) > 1e-3
    # for unit vectors tr(Cov) (unbiased) is the mean pairwise cosine distance: one output, not two
    assert result.variance_normalised == pytest.approx(float(feature_variance(normalised)), rel=1e-5)
    assert result.variance_normalised == pytest.approx(float(mean_pairwise_distance(normalised)), rel=1e-4)
    report = result.report()
    assert f"Vendi (q=1): {result.vendi:.3f}" in report and f"raw features: {result.variance:.4g}" in report
    assert f"normalised features: {result.variance_normalised:.4f}" in report


def test_group_scores_are_per_prompt_means():
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    result = diversity_of(features, q=2.0, group_size=3)
    per_group = vendi_score(features.reshape(2, 3, 8), q=2.0)
    assert result.vendi == pytest.approx(float(per_group.mean()), rel=1e-6)
    assert [g[0] for g in result.per_group] == pytest.approx(per_group.tolist(), rel=1e-6)
    assert "group 1" in result.report()
    with pytest.raises(PECError, match="do not split into groups of 4"):
        diversity_of(features, group_size=4)


def test_one_image_scores_one_with_a_note(toy_encoder):
    features, _ = embed_images(toy_encoder, _images(1))
    result = diversity_of(features)
    assert result.vendi == 1.0 and result.variance == 0.0 and result.variance_normalised == 0.0
    assert result.notes == [ONE_IMAGE_NOTE] and "note: one image" in result.report()


def test_mixed_sizes_are_embedded_as_they_are_and_resized_to_concatenate(toy_encoder):
    small, wide = _images(2, (32, 32)), _images(3, (32, 48), seed=1)
    features, notes = embed_images(toy_encoder, [small, wide])
    assert features.shape[0] == 5 and "2 sizes (32x32, 48x32)" in notes[0]
    assert torch.allclose(features[2:], toy_encoder(wide), atol=1e-5)
    batch, notes = concat_images([small, wide])
    assert batch.shape == (5, 32, 32, 3) and "resized to 32x32" in notes[0]
    with pytest.raises(PECError, match="no images"):
        embed_images(toy_encoder, [small[:0]])
    with pytest.raises(PECError, match=r"\[B, H, W, 3\]"):
        concat_images(torch.rand(2, 3, 8, 8))


def test_heatmap_has_thumbnails_value_labels_and_a_colour_scale():
    images = _images(3, (20, 40))
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    heat = similarity_heatmap(features, images, max_side=200)
    cell = 200 // 4
    side = 4 * cell
    assert heat.shape[:3] == (1, side, side + heat.shape[2] - side) and heat.shape[2] > side + 30  # scale at right
    corner = heat[0, cell + 4, cell + 4]  # a cell's corner: its colour, away from the label
    off = heat[0, cell + 4, 2 * cell + 4]
    assert corner[0] > 0.9 and off[0] < 0.3  # identical: yellow; the least similar pair: dark blue
    assert heat[0, :cell, cell : 2 * cell].std() > 0  # a thumbnail, not blank
    label = heat[0, cell + cell // 2 - 6 : cell + cell // 2 + 6, cell + 8 : 2 * cell - 8]
    assert label.std() > 0.1  # "1.00" written on the diagonal cell
    strip = heat[0, cell:, side + 20]  # the colour strip: yellow at the top, dark blue at the bottom
    assert strip[0, 0] > 0.9 and strip[-1, 0] < 0.3 and strip[-1, 2] > strip[-1, 0]
    legend = heat[0, cell:, side + 34 :]
    assert (legend < 0.5).any()  # the scale's value labels


def test_probe_entropy_is_the_library_estimator():
    gen = torch.Generator().manual_seed(2)
    samples, mean = torch.randn(4, 2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    result = probe_entropy(samples, mean, 0.3)
    h = perceptual_entropy(samples.reshape(8, 5), mean.repeat(4, 1), 0.3)
    assert result.entropy == pytest.approx(float(h.mean()), rel=1e-6)
    assert result.vendi == pytest.approx(float(vendi_score(samples.transpose(0, 1)).mean()), rel=1e-6)
    assert "perceptual entropy H_A" in result.report(2, 0.8, 0.7, 0.3, 4)


# ----------------------------------------------------------------------------- LoRA checks


def _info(architecture="sd3", declared=None, notes=()) -> LoraInfo:
    return LoraInfo(
        path="x.safetensors",
        file_bytes=100,
        architecture=architecture,
        declared_architecture=declared,
        architecture_mismatch=False,
        rank=4,
        ranks=[4],
        module_count=2,
        module_kinds={},
        dtypes=["F32"],
        parameter_count=10,
        scale_baked=True,
        base_model="some/model",
        title="t",
        usage_hint="use it",
        provenance={"method": "pec", "beta": 0.1},
        metadata_keys=[],
        notes=list(notes),
    )


def test_model_and_lora_families():
    assert model_family(["FluxSchnell", "Flux", "BASE"]) == "flux"
    assert model_family(["SD3", "BASE"]) == "sd3"
    assert model_family(["SDXL", "BASE"]) == "other:SDXL"
    assert lora_family(_info("sd3", "stable-diffusion-v3.5-large/lora")) == "sd3"
    assert lora_family(_info("unknown", "flux-1-dev/lora")) == "flux"
    assert lora_family(_info("sd3", "pec-embedded-sd3-toy/lora")) == "sd3"
    assert lora_family(_info("unknown")) == "unknown"


def test_lora_check_reports_keys_and_refuses_another_family():
    coverage = lora_key_coverage(["transformer.a.lora_A.weight", "transformer.b.lora_A.weight"], ["a", "c"])
    summary, warnings = check_lora(_info(), coverage, "sd3")
    assert "1 of 2 modules matched" in summary and "1 unmatched" in summary and "β=0.1" in summary
    assert "use it" in summary and any("no counterpart" in w for w in warnings)
    with pytest.raises(PECError, match="for FLUX models but the model is sd3.*allow_mismatch"):
        check_lora(_info("flux"), coverage, "sd3")
    summary, warnings = check_lora(_info("flux"), coverage, "sd3", allow_mismatch=True)
    assert "WARNING" in summary and "for FLUX models" in warnings[0]
    with pytest.raises(PECError, match="none of the LoRA's 2 modules"):
        check_lora(_info(), lora_key_coverage(["transformer.a.lora_A.weight", "b.lora_A.weight"], ["z"]), "sd3")


# ----------------------------------------------------------------------------- encoder sources


def test_encoder_folders_are_listed_and_recognised(tmp_path):
    (tmp_path / "dinov2-small").mkdir()
    (tmp_path / "dinov2-small" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (tmp_path / "nested" / "PickScore_v1").mkdir(parents=True)
    (tmp_path / "nested" / "PickScore_v1" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "vit-b").mkdir()
    (tmp_path / "vit-b" / "open_clip_config.json").write_text("{}")
    (tmp_path / "mine.safetensors").write_bytes(b"")
    (tmp_path / "mine.json").write_text("{}")
    (tmp_path / "stray.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    entries = list_encoder_entries([str(tmp_path), str(tmp_path / "missing")])
    assert entries == ["dinov2-small", "mine.safetensors", "nested/PickScore_v1", "vit-b"]
    names = [guess_encoder_name(tmp_path / e) for e in entries]
    assert names == ["dinov2", "toy", "pickscore", "clip"]
    with pytest.raises(PECError, match="cannot tell which encoder"):
        guess_encoder_name(tmp_path / "empty")


def test_folder_load_failures_are_one_line_errors(tmp_path):
    with pytest.raises(PECError, match="unknown encoder type"):
        load_from_folder(tmp_path, "vgg")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    broken.with_suffix(".json").write_text(json.dumps({"dim": 8}))
    with pytest.raises(PECError, match="cannot load the toy encoder") as err:
        load_from_folder(broken)
    assert "\n" not in str(err.value)


def test_clip_vision_wrapper_uses_comfyuis_pooled_embeds():
    calls = []

    class FakeClipVision:
        image_size = 224

        def encode_image(self, image, crop=True):
            calls.append((tuple(image.shape), crop))
            return {"image_embeds": image.mean(dim=(1, 2)) + 1.0}

    encoder = ClipVisionEncoder(FakeClipVision())
    images = _images(3, (16, 24))
    features = encoder(images)
    assert calls == [((3, 16, 24, 3), True)]
    assert torch.allclose(features, torch.nn.functional.normalize(images.mean(dim=(1, 2)) + 1.0, dim=-1))
    with pytest.raises(PECError, match="CLIP_VISION"):
        ClipVisionEncoder(object())


# ----------------------------------------------------------------------------- registry and packaging


def test_every_node_is_registered_with_pec_ids_and_categories():
    assert sorted(NODE_CLASS_MAPPINGS) == sorted(spec.node_id for spec in SPECS)
    assert all(s.node_id.startswith("PEC") and s.category.startswith("PEC/") for s in SPECS)


def test_v1_fallback_runs_a_list_input_node(toy_encoder):
    classes, names = build_nodes(SPECS, v3=False)
    node = classes["PECSelectDiverse"]
    inputs = node.INPUT_TYPES()["required"]
    assert list(inputs) == ["images", "encoder", "k", "q"] and inputs["k"][1]["default"] == 4
    assert node.RETURN_TYPES == ("IMAGE", "STRING", "FLOAT") and node.INPUT_IS_LIST
    images = _images(5)
    images[3] = images[0]  # a duplicate is never picked while distinct images remain
    out = node().run(images=[images[:2], images[2:]], encoder=[toy_encoder], k=[3], q=[1.0])
    picked, indices, vendi = out["result"]
    assert out["ui"]["text"][0].startswith(f"kept 3 of 5: images {indices}")  # shown in the node
    assert picked.shape == (3, 32, 32, 3) and len(indices.split(",")) == 3
    assert not {"0", "3"} <= set(indices.split(","))
    assert vendi == pytest.approx(float(vendi_score(toy_encoder(picked))), rel=1e-4)
    assert names["PECSelectDiverse"] == "PEC Select Diverse"
    too_many = node().run(images=[images], encoder=[toy_encoder], k=[9], q=[1.0])
    assert "note: asked for 9 of 5 images: keeping all 5" in too_many["ui"]["text"][0]


def test_every_input_and_output_has_a_tooltip():
    assert [(s.node_id, i.name) for s in SPECS for i in [*s.inputs, *s.outputs] if not i.tooltip] == []


HEAVY = ("diffusers", "peft", "transformers", "trainer", "open_clip", "comfy", "comfy_api", "folder_paths", "torch")


def test_importing_the_node_pack_is_light():
    code = "import sys, json, comfy_pec.nodes; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in mods if m.split(".")[0] in HEAVY]


def test_run_functions_take_exactly_the_declared_inputs():
    # ComfyUI passes the inputs as keywords: a renamed input must not silently drop a value.
    for spec in SPECS:
        params = list(inspect.signature(spec.run).parameters)
        assert params == [i.name for i in spec.inputs], spec.node_id


def test_workflow_files_are_built_from_their_description_and_fit_the_nodes():
    sys.path.insert(0, str(ROOT / "workflows"))
    import build_workflows

    specs = {spec.node_id: spec for spec in SPECS}
    for make in build_workflows.WORKFLOWS:
        workflow = make()
        ui, api = (json.loads(json.dumps(f(workflow))) for f in (build_workflows.to_ui, build_workflows.to_api))
        assert json.loads((ROOT / "workflows" / f"{workflow.name}.json").read_text()) == ui
        assert json.loads((ROOT / "workflows" / "api" / f"{workflow.name}.json").read_text()) == api
        for link_id, _src, _slot, dst, dst_slot, kind in ui["links"]:
            target = next(n for n in ui["nodes"] if n["id"] == dst)
            assert target["inputs"][dst_slot]["type"] in (kind, "*") and target["inputs"][dst_slot]["link"] == link_id
        for node in api.values():
            spec = specs.get(node["class_type"])
            if spec is None:
                continue
            assert set(node["inputs"]) == {i.name for i in spec.inputs if not i.optional}
            for i in spec.inputs:
                value = node["inputs"].get(i.name)
                if i.type == "COMBO" and not callable(i.options):
                    assert value in i.options
                if i.type in ("INT", "FLOAT"):
                    assert i.min <= value <= i.max
