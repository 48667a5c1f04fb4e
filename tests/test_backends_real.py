"""SD3.5 and FLUX.1 backends on tiny pipelines of the real architectures, built from configs, saved, and
loaded back through `load_backend` (the path a downloaded model takes): velocity against a direct
transformer call, FLUX packing and schedule, prompt cache and offload, single-file loading, and one PEC
iteration of `trainer.train` per family whose LoRA loads in diffusers and ComfyUI at the trained strength."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
import yaml

from comfy_pec import PECError
from comfy_pec.lora_format import load_lora
from comfy_pec.sde import flux_schedule
from trainer import rewards as reward_registry
from trainer.backends import detect_family, load_backend
from trainer.backends.flux import FluxBackend, pack_latents, unpack_latents
from trainer.backends.random_init import SPECS, build_pipeline, save_pipeline
from trainer.backends.sd3 import SD3Backend
from trainer.checkpoint import latest_checkpoint, load_state
from trainer.config import ConfigError, load_config
from trainer.lora import target_regex
from trainer.runlog import read_log
from trainer.train import train

# LoRA family name (tests/tiny_models.FAMILIES) -> (random-init spec, the ComfyUI-compatible transformer)
PIPELINES = {"sd3.5-medium": ("tiny-sd3.5", tm.SD35M_CONFIG), "flux": ("tiny-flux", tm.FLUX_CONFIG)}
PROMPTS = ["a red circle", "a blue square on the left", "a green star"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Per family: a saved tiny pipeline (SD3.5 with T5) whose transformer is the one of tests/tiny_models."""
    out = {}
    for family, (name, transformer) in PIPELINES.items():
        spec = dataclasses.replace(SPECS[name], transformer=transformer)
        folder = tmp_path_factory.mktemp(name)
        save_pipeline(build_pipeline(spec, seed=3), folder, spec.defaults)
        out[family] = str(folder)
    return out


@pytest.fixture(scope="module")
def sd3(model_dirs):
    return load_backend(model_dirs["sd3.5-medium"], use_t5=True)


@pytest.fixture(scope="module")
def flux(model_dirs):
    return load_backend(model_dirs["flux"])


def test_load_through_the_real_path(sd3, flux, model_dirs):
    assert detect_family(model_dirs["flux"]) == "flux" and isinstance(flux, FluxBackend)
    assert isinstance(sd3, SD3Backend) and sd3.pipe.text_encoder_3 is not None
    assert (sd3.architecture, flux.architecture) == ("sd3.5-medium", "flux")
    assert flux.defaults["guidance_scale"] == 3.5 and flux.defaults["max_sequence_length"] == 8
    for backend in (sd3, flux):
        assert not any(p.requires_grad for p in backend.transformer.parameters())
    assert sd3.latent_shape(32, 32) == (16, 16, 16) and flux.latent_shape(32, 48) == (64, 8, 12)
    with pytest.raises(PECError, match="multiple of 4"):
        flux.latent_shape(30, 32)
    with pytest.raises(PECError, match="T5"):
        load_backend(model_dirs["flux"], use_t5=False)


def test_sd3_velocity_is_the_transformer_with_cfg(sd3):
    x = torch.randn(3, *sd3.latent_shape(32, 32))
    cond = sd3.encode_prompts(PROMPTS)
    # CLIP-L ‖ CLIP-G tokens, then the T5 tokens (nonzero: T5 is loaded)
    assert cond.embeds.shape == (3, 16 + 8, 32) and cond.pooled.shape == (3, 32)
    assert cond.embeds[:, 16:].abs().sum() > 0
    uncond = sd3.empty_embeds(3)

    def direct(embeds):
        return sd3.transformer(
            hidden_states=x,
            timestep=torch.full((3,), 600.0),
            encoder_hidden_states=embeds.embeds,
            pooled_projections=embeds.pooled,
            return_dict=False,
        )[0]

    with torch.no_grad():
        v = sd3.velocity(x, 0.6, cond, 4.5)
        expected = direct(uncond) + 4.5 * (direct(cond) - direct(uncond))
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)


def test_sd3_without_t5_has_zero_t5_tokens(model_dirs):
    backend = load_backend(model_dirs["sd3.5-medium"])
    assert backend.pipe.text_encoder_3 is None
    embeds = backend.encode_prompts(PROMPTS[:1]).embeds
    assert embeds.shape == (1, 24, 32) and embeds[:, 16:].abs().sum() == 0


def test_flux_velocity_is_the_pipeline_call(flux):
    """The backend's layout, ids, timestep and guidance give what FluxPipeline feeds its transformer."""
    from diffusers import FluxPipeline

    cond = flux.encode_prompts(PROMPTS[:2])
    assert cond.embeds.shape == (2, 8, 32) and cond.pooled.shape == (2, 32)
    vae_latents = torch.randn(2, 16, 16, 24)  # a 32x48 image: not square on purpose
    x = pack_latents(vae_latents)
    tokens = FluxPipeline._pack_latents(vae_latents, 2, 16, 16, 24)
    with torch.no_grad():
        v = flux.velocity(x, 0.8, cond, 3.5)
        direct = flux.transformer(
            hidden_states=tokens,
            timestep=torch.full((2,), 0.8),
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(8, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 12, "cpu", torch.float32),
            return_dict=False,
        )[0]
    torch.testing.assert_close(v.flatten(2).transpose(1, 2), direct)
    # Guidance is an embedding, not CFG: another strength changes the output, no second branch needed.
    assert not torch.allclose(flux.velocity(x, 0.8, cond, 1.0).detach(), v)


def test_flux_packing_round_trips(flux):
    from diffusers import FluxPipeline

    z = torch.randn(3, 16, 8, 12)
    packed = pack_latents(z)
    assert packed.shape == (3, 64, 4, 6)
    assert torch.equal(unpack_latents(packed), z)
    assert torch.equal(packed.flatten(2).transpose(1, 2), FluxPipeline._pack_latents(z, 3, 16, 8, 12))
    assert torch.equal(FluxPipeline._unpack_latents(packed.flatten(2).transpose(1, 2), 8, 12, 1), z)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        latents = flux.encode_images(images)
        assert latents.shape == (2, *flux.latent_shape(32, 32))
        assert flux.decode(latents).shape == images.shape


@pytest.mark.parametrize("size", [(32, 32), (512, 768)])
def test_flux_schedule_is_the_dynamic_shift(flux, size):
    """flux_schedule of the packed token count, and what diffusers' scheduler does for FLUX.1-dev."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq_len = (size[0] // 4) * (size[1] // 4)
    sigmas = flux.schedule(6, *size)
    torch.testing.assert_close(sigmas, flux_schedule(6, seq_len))
    scheduler = flux.pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(seq_len))
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)


def test_prompt_cache_and_offloaded_text_encoders(model_dirs, flux):
    backend = load_backend(model_dirs["flux"], prompt_cache=2, offload_text_encoders=True)
    got = backend.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert len(backend.prompt_cache) == 2
    assert all(p.device.type == "cpu" for m in backend.text_encoders for p in m.parameters())
    alone = [flux.encode_prompts([p]) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0])]
    torch.testing.assert_close(got.embeds, torch.cat([a.embeds for a in alone]))
    torch.testing.assert_close(got.pooled, torch.cat([a.pooled for a in alone]))
    backend.encode_prompts([PROMPTS[2]])  # evicts the least recently used one
    assert backend.prompt_cache.get(PROMPTS[1]) is None and backend.prompt_cache.get(PROMPTS[2]) is not None
    with pytest.raises(PECError, match="prompt_cache"):
        backend.cache_prompts(["x", "y", "z"])


def test_bf16_network_float32_velocity_and_checkpointing(model_dirs):
    backend = load_backend(model_dirs["flux"], dtype=torch.bfloat16, gradient_checkpointing=True)
    assert backend.transformer.dtype == torch.bfloat16 and backend.vae.dtype == torch.float32
    assert backend.transformer.gradient_checkpointing
    cond = backend.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *backend.latent_shape(32, 32))
    with torch.no_grad():
        v = backend.velocity(x, 0.5, cond, 3.5)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_checkpointing_gives_the_same_lora_gradient(model_dirs):
    from peft import LoraConfig

    grads = []
    for checkpointing in (False, True):
        backend = load_backend(model_dirs["flux"], gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        backend.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=tm.FLUX_TARGETS))
        cond = backend.encode_prompts(PROMPTS[:2])
        x = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
        backend.transformer.train()
        backend.velocity(x, 0.5, cond, 3.5).square().mean().backward()
        grads.append([p.grad.clone() for n, p in backend.transformer.named_parameters() if "lora_A" in n])
    assert len(grads[0]) > 0
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", list(PIPELINES))
def test_single_file_transformer_with_base(model_dirs, tmp_path, family):
    from safetensors.torch import save_file

    base = model_dirs[family]
    reference = load_backend(base)
    state = {k: v * 0.5 for k, v in reference.transformer.state_dict().items()}  # different weights
    file = tmp_path / "transformer.safetensors"
    save_file(state, str(file))
    with pytest.raises(PECError, match="model.base"):
        load_backend(str(file), family=reference.family)
    backend = load_backend(str(file), base=base)
    assert type(backend) is type(reference) and backend.defaults == reference.defaults
    loaded = backend.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_model_config_rules():
    cfg = load_config("flux-dev-pickscore", None, ["model.path=flux1-dev.safetensors", "model.base=/models/flux-dev"])
    assert cfg.model.base == "/models/flux-dev"
    with pytest.raises(ConfigError, match="set model.base"):
        load_config("flux-dev-pickscore", None, ["model.path=flux1-dev.safetensors"])
    with pytest.raises(ConfigError, match="only for a single-file"):
        load_config("demo", None, ["model.base=/models/flux-dev"])
    with pytest.raises(ConfigError, match="use_t5 cannot be false"):
        load_config("flux-dev-pickscore", None, ["model.use_t5=false"])
    with pytest.raises(ConfigError, match="did you mean model.gradient_checkpointing"):
        load_config("demo", None, ["model.gradient_checkpoint=true"])


# ----------------------------------------------------------------------------- one PEC iteration


def _redness(images, prompts):
    """A model-free reward for the tiny models: mean red minus mean green."""
    return images[:, 0].mean((1, 2)) - images[:, 1].mean((1, 2))


PRESETS = {"sd3.5-medium": "sd35m-pickscore", "flux": "flux-dev-pickscore"}


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
    """Per family: (run dir, config, the PEFT-adapted transformer rebuilt from the checkpoint)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(reward_registry.REWARDS, "test_redness", lambda **_: _redness)
        for family, preset in PRESETS.items():
            config = _config(preset, model_dirs[family], tmp_path_factory.mktemp(f"run-{family}"))
            run = train(config)
            model = load_backend(model_dirs[family]).transformer
            lora = config.lora
            model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=target_regex(lora.targets)))
            set_peft_model_state_dict(model, load_state(latest_checkpoint(run))["lora"])
            out[family] = (run, config, model)
    return out


@pytest.mark.parametrize("family", list(PIPELINES))
def test_one_pec_iteration(trained, family):
    run, config, _ = trained[family]
    (row,) = read_log(run)
    assert row["window_steps"] == [0, 1]  # every step but the last
    for key in ("reward_mean", "perceptual_entropy", "policy_loss", "grad_norm", "time_rollout", "time_update"):
        assert np.isfinite(row[key]), key
    assert config.model.gradient_checkpointing and config.model.prompt_cache > 0  # the preset's memory options
    assert (run / "report.md").is_file()


@pytest.mark.parametrize("family", list(PIPELINES))
def test_trained_lora_loads_in_diffusers_at_trained_strength(trained, model_dirs, family):
    run, _, model = trained[family]
    inputs = tm.FAMILIES[family][1]
    ref = tm.forward(model, inputs())
    model.disable_adapters()
    base = tm.forward(model, inputs())
    model.enable_adapters()
    assert (ref - base).abs().max() > 1e-3 * ref.abs().max(), "the trained LoRA should change the output"
    transformer = load_backend(model_dirs[family]).transformer
    pipe = tm.fresh_pipeline(family, transformer=transformer)
    with tm.captured_log("diffusers") as messages:
        pipe.load_lora_weights(str(run / "lora.safetensors"))
    assert tm.key_warnings(messages) == []
    tm.assert_close(tm.forward(pipe.transformer, inputs()), ref, rel=1e-5)


@pytest.fixture(scope="module")
def comfy():
    return tm.import_comfy()


@pytest.mark.comfyui
@pytest.mark.parametrize("family", list(PIPELINES))
def test_trained_lora_loads_in_comfyui_with_every_key(comfy, trained, model_dirs, family, caplog):
    run, _, model = trained[family]
    inputs = tm.FAMILIES[family][1]
    patcher = tm.comfy_model(comfy, family, load_backend(model_dirs[family]).transformer.state_dict())
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    tensors, _ = load_lora(run / "lora.safetensors")
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(patches) == len({k for k in tensors if k.endswith(".lora_A.weight")})
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    tm.assert_close(tm.comfy_forward(patcher, family, inputs()), tm.forward(model, inputs()), rel=1e-5)
