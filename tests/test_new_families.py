"""Z-Image and Qwen-Image backends on tiny pipelines of the real architectures, built from configs, saved
and loaded back through `load_backend`: sampling (schedule, packing, velocity, CFG) against the diffusers
pipelines' own loop, one PEC iteration of `trainer.train` with the family's preset, the exported LoRA
in a fresh diffusers pipeline and in ComfyUI 0.8.0 ($COMFYUI_PATH), `pec inspect` and the LoRA Loader check."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
import yaml

from comfy_pec import PECError
from comfy_pec.lora_format import ARCHITECTURES, inspect_lora, load_lora, lora_key_coverage
from comfy_pec.nodes.lora_check import check_lora, model_family
from comfy_pec.sde import scheduler_schedule
from trainer import rewards as reward_registry
from trainer.backends import detect_family, load_backend
from trainer.backends.qwenimage import QwenImageBackend
from trainer.backends.random_init import LLM_SPECS, build_llm_pipeline, save_pipeline
from trainer.backends.zimage import ZImageBackend
from trainer.checkpoint import latest_checkpoint, load_state
from trainer.config import load_config
from trainer.runlog import read_log
from trainer.train import train

# backend family -> (random-init spec, preset, backend class, LoRA architecture)
FAMILIES = {
    "zimage": ("tiny-zimage", "zimage-turbo-pickscore", ZImageBackend, "zimage"),
    "qwenimage": ("tiny-qwenimage", "qwen-image-pickscore", QwenImageBackend, "qwen-image"),
}
PROMPTS = ["a red circle", "a blue square on the left", "a green star"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for family, (spec, *_) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(spec)
        save_pipeline(build_llm_pipeline(spec, seed=3), folder, LLM_SPECS[spec].defaults)
        out[family] = str(folder)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_through_the_real_path(model_dirs, family):
    _, _, cls, architecture = FAMILIES[family]
    backend = load_backend(model_dirs[family])
    assert detect_family(model_dirs[family]) == family and type(backend) is cls
    assert backend.architecture == architecture
    assert not any(p.requires_grad for p in backend.transformer.parameters())
    cond = backend.encode_prompts(PROMPTS)
    lengths = cond.pooled.sum(1)
    assert cond.embeds.shape == (3, 48, 32) and (lengths > 0).all() and len(set(lengths.tolist())) > 1
    # padding is zero and the prompts differ
    assert cond.embeds[cond.pooled == 0].abs().sum() == 0
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        latents = backend.encode_images(images)
        assert latents.shape == (2, *backend.latent_shape(32, 32))
        assert backend.decode(latents).shape == images.shape
    with pytest.raises(PECError, match="multiple of 4"):
        backend.latent_shape(30, 32)


def _pipeline_latents(backend, family: str, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """The diffusers pipeline's own sampling loop from ``noise`` (our layout), output in our layout."""
    pipe = backend.pipe
    if family == "zimage":
        out = pipe(
            prompt=PROMPTS[:2],
            latents=noise,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            max_sequence_length=backend.max_sequence_length,
            output_type="latent",
        ).images
        return out
    tokens = noise.flatten(2).transpose(1, 2)  # the packed sequence the pipeline carries
    out = pipe(
        prompt=PROMPTS[:2],
        negative_prompt="",
        latents=tokens,
        num_inference_steps=steps,
        true_cfg_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=backend.max_sequence_length,
        output_type="latent",
    ).images
    return out.transpose(1, 2).reshape(noise.shape)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_euler_sampling_is_the_pipeline_loop(model_dirs, family, guidance):
    """Schedule, layout, timestep convention, velocity sign and the family's CFG rule together: the
    backend's Euler ODE from the same noise ends where the diffusers pipeline does."""
    backend = load_backend(model_dirs[family])
    steps = 3
    noise = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
    sigmas = backend.schedule(steps, 32, 32)
    cond = backend.encode_prompts(PROMPTS[:2])
    x = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * backend.velocity(x, float(sigma), cond, guidance)
        expected = _pipeline_latents(backend, family, noise, steps, guidance)
    torch.testing.assert_close(x, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", [(32, 32), (1024, 768)])
def test_schedule_is_the_scheduler(model_dirs, family, size):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    backend = load_backend(model_dirs[family])
    scheduler = backend.pipe.scheduler
    seq_len = (size[0] // 4) * (size[1] // 4)  # tiny VAE: 2x down-sampling, then 2x2 patches
    cfg = scheduler.config
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    sigmas = backend.schedule(6, *size)
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)
    if family == "qwenimage":
        assert abs(float(sigmas[-2]) - 0.02) < 1e-6  # stretched to Qwen-Image's terminal sigma
    with pytest.raises(PECError, match="time_shift_type"):
        scheduler_schedule(6, seq_len, dict(cfg, time_shift_type="linear"))


# ----------------------------------------------------------------------------- one PEC iteration


def _redness(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 1].mean((1, 2))


def _config(preset: str, model_dir: str, run_dir: Path):
    """The family's real preset with tiny sizes: 2 prompts x 2 samples, 3 steps, 1 iteration, rank 4."""
    values = {
        "model.path": model_dir,
        "model.dtype": "float32",
        "model.device": "cpu",
        "run.dir": str(run_dir),
        "run.progress": False,
        "run.tensorboard": "off",
        "rewards": [{"name": "test_redness"}],
        "pec.encoder": "toy",
        "pec.chunk_size": 8,
        "prompts.train": PROMPTS[:2],
        "prompts.eval": PROMPTS[:1],
        "sampling.resolution": 32,
        "sampling.num_steps": 3,
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.init_scale": 0.05,
        "train.iterations": 1,
        "train.prompts_per_iteration": 2,
        "train.group_size": 2,
        "train.batch_size": 4,
        "train.ema.enabled": False,
        "checkpoint.every": 1,
        "report.grid_prompts": 1,
        "report.grid_seeds": [0],
    }
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]
    return load_config(preset, None, overrides)


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory):
    """Per family: (run dir, config, a backend whose transformer carries the trained PEFT adapter)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(reward_registry.REWARDS, "test_redness", lambda **_: _redness)
        for family, (_, preset, *_) in FAMILIES.items():
            config = _config(preset, model_dirs[family], tmp_path_factory.mktemp(f"run-{family}"))
            run = train(config)
            backend = load_backend(model_dirs[family])
            lora = config.lora
            backend.transformer.add_adapter(
                LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets))
            )
            set_peft_model_state_dict(backend.transformer, load_state(latest_checkpoint(run))["lora"])
            out[family] = (run, config, backend)
    return out


def _fixed_velocity(backend, guidance: float) -> torch.Tensor:
    x = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return backend.velocity(x, 0.6, backend.encode_prompts(PROMPTS[:2]), guidance)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pec_iteration(trained, family):
    run, config, backend = trained[family]
    (row,) = read_log(run)
    assert row["window_steps"] == [0, 1]
    for key in ("reward_mean", "perceptual_entropy", "policy_loss", "grad_norm"):
        assert np.isfinite(row[key]), key
    assert config.model.gradient_checkpointing and config.model.offload_text_encoders  # the preset's memory options
    modules = {n for n, m in backend.transformer.named_modules() if hasattr(m, "lora_A")}
    if family == "zimage":  # attention and MLP of the main and refiner blocks
        assert {
            "layers.0.feed_forward.w2",
            "noise_refiner.0.attention.to_q",
            "context_refiner.0.attention.to_out.0",
        } <= modules
    else:  # both streams' attention and MLPs
        assert {"transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.txt_mlp.net.2"} <= modules


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_lora_reloads_in_a_fresh_diffusers_pipeline(trained, model_dirs, family):
    run, config, adapted = trained[family]
    guidance = config.sampling.guidance_scale
    ref = _fixed_velocity(adapted, guidance)
    adapted.transformer.disable_adapters()
    base = _fixed_velocity(adapted, guidance)
    adapted.transformer.enable_adapters()
    assert (ref - base).abs().max() > 1e-3 * ref.abs().max(), "the trained LoRA should change the output"

    fresh = load_backend(model_dirs[family])
    with tm.captured_log("diffusers") as messages:
        fresh.pipe.load_lora_weights(str(run / "lora.safetensors"))
    assert tm.key_warnings(messages) == []
    loaded = {n for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A")}
    tensors, _ = load_lora(run / "lora.safetensors")
    assert loaded == {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    tm.assert_close(_fixed_velocity(fresh, guidance), ref, rel=1e-5)
    # and through the backend's own loader (with its fit check)
    again = load_backend(model_dirs[family])
    again.load_lora(str(run / "lora.safetensors"))
    tm.assert_close(_fixed_velocity(again, guidance), ref, rel=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inspect_and_loader_check_name_the_family(trained, family, capsys):
    from trainer.cli import main

    run, *_ = trained[family]
    architecture = FAMILIES[family][3]
    info = inspect_lora(run / "lora.safetensors")
    assert info.architecture == architecture and not info.architecture_mismatch and info.scale_baked
    _, metadata = load_lora(run / "lora.safetensors")
    assert (metadata["modelspec.architecture"], metadata["ss_base_model_version"]) == ARCHITECTURES[architecture]
    main(["inspect", str(run / "lora.safetensors")])
    assert architecture in capsys.readouterr().out
    coverage = lora_key_coverage(load_lora(run / "lora.safetensors")[0], ["transformer_blocks.0.attn.to_q"])
    comfy_class = {"zimage": ["ZImage", "Lumina2"], "qwenimage": ["QwenImage"]}[family]
    assert model_family(comfy_class) == architecture
    with pytest.raises(PECError, match=f"for {architecture.upper()} models but the model is flux"):
        check_lora(info, coverage, model_family(["Flux"]))


# ----------------------------------------------------------------------------- ComfyUI


def _zimage_to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Z-Image weights -> ComfyUI's Lumina2/NextDiT names (q, k, v fused into qkv)."""
    renames = {
        ".attention.to_out.0.": ".attention.out.",
        ".attention.norm_q.": ".attention.q_norm.",
        ".attention.norm_k.": ".attention.k_norm.",
        "all_x_embedder.2-1.": "x_embedder.",
        "all_final_layer.2-1.": "final_layer.",
    }
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts)
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _comfy_to_zimage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_zimage_to_comfy`."""
    out = {}
    for key, value in state.items():
        if ".attention.qkv." in key:
            for name, part in zip("qkv", value.chunk(3)):
                out[key.replace(".qkv.", f".to_{name}.")] = part
            continue
        for new, old in (
            (".attention.to_out.0.", ".attention.out."),
            (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."),
            ("all_x_embedder.2-1.", "x_embedder."),
            ("all_final_layer.2-1.", "final_layer."),
        ):
            key = key.replace(old, new)
        out[key] = value
    return out


def _comfy_model(comfy, family: str, transformer):
    """A ComfyUI ModelPatcher around the tiny transformer. ComfyUI detects Z-Image only at full width
    (dim 3840) and hard-codes Qwen-Image's widths, so the model config is given explicitly."""
    spec = LLM_SPECS[FAMILIES[family][0]].transformer
    diffusers_state = transformer.state_dict()
    if family == "zimage":
        state = _zimage_to_comfy(diffusers_state)
        unet = dict(
            image_model="lumina2",
            patch_size=2,
            in_channels=16,
            dim=spec["dim"],
            cap_feat_dim=spec["cap_feat_dim"],
            n_layers=spec["n_layers"],
            n_refiner_layers=spec["n_refiner_layers"],
            qk_norm=True,
            n_heads=spec["n_heads"],
            n_kv_heads=spec["n_kv_heads"],
            axes_dims=spec["axes_dims"],
            axes_lens=spec["axes_lens"],
            rope_theta=256.0,
            ffn_dim_multiplier=8.0 / 3.0,
            z_image_modulation=True,
            time_scale=1000.0,
            pad_tokens_multiple=32,
        )
        config = comfy.supported_models.ZImage(unet)
    else:
        state = dict(diffusers_state)
        unet = dict(
            image_model="qwen_image",
            in_channels=spec["in_channels"],
            out_channels=spec["out_channels"],
            num_layers=spec["num_layers"],
            attention_head_dim=spec["attention_head_dim"],
            num_attention_heads=spec["num_attention_heads"],
            joint_attention_dim=spec["joint_attention_dim"],
            axes_dims_rope=spec["axes_dims_rope"],
        )
        config = comfy.supported_models.QwenImage(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state, "")
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], []), (missing, unexpected)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def comfy():
    import importlib

    module = tm.import_comfy()
    importlib.import_module("comfy.supported_models")
    return module


@pytest.mark.comfyui
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_lora_loads_in_comfyui_with_every_key(comfy, trained, model_dirs, family, caplog):
    """Every exported key maps in ComfyUI 0.8.0's loader, and the weights ComfyUI patches, read back in the
    diffusers layout, give the adapted model's velocity."""
    run, config, adapted = trained[family]
    base = load_backend(model_dirs[family])
    patcher = _comfy_model(comfy, family, base.transformer)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    tensors, _ = load_lora(run / "lora.safetensors")
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    modules = {k for k in tensors if k.endswith(".lora_A.weight")}
    # one patch per module (Z-Image's q, k and v patch slices of the fused qkv weight)
    assert len(patches) == len(modules)
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    patched = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    if family == "zimage":
        patched = _comfy_to_zimage(patched)
    base.transformer.load_state_dict(patched)
    guidance = config.sampling.guidance_scale
    tm.assert_close(_fixed_velocity(base, guidance), _fixed_velocity(adapted, guidance), rel=1e-5)


# ----------------------------------------------------------------------------- FLUX.2: recognised, refused on FLUX.1


def test_flux2_lora_is_recognised_and_refused_on_flux1(tmp_path):
    """A diffusers-layout FLUX.2 LoRA (as other trainers write it): `pec inspect` names FLUX.2, the LoRA
    Loader check refuses it on a FLUX.1 model and accepts it on FLUX.2, and save_lora will not write one in
    the layout ComfyUI cannot load."""
    from diffusers import Flux2Transformer2DModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from comfy_pec.lora_format import save_lora

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 4, 4),
        timestep_guidance_channels=16,
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.linear_in", "ff.linear_out", "to_qkv_mlp_proj"]
    tm.add_random_lora(model, targets=targets)
    state = {"transformer." + k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    path = tmp_path / "flux2.safetensors"
    save_file(state, str(path))
    info = inspect_lora(path)
    assert info.architecture == "flux2"
    coverage = lora_key_coverage(state, [n for n, _ in model.named_modules()])
    assert model_family(["Flux2", "Flux", "BASE"]) == "flux2"
    check_lora(info, coverage, model_family(["Flux2", "Flux", "BASE"]))
    with pytest.raises(PECError, match="this LoRA is for FLUX2 models but the model is flux"):
        check_lora(info, coverage, model_family(["Flux", "BASE"]))
    with pytest.raises(PECError, match="BFL"):
        save_lora(state, tmp_path / "out.safetensors", alpha=4)
