"""Z-Image, Qwen-Image and FLUX.2-klein backends on tiny pipelines of the real architectures, built from configs, saved
and loaded back through `load_backend`: sampling (schedule, packing, velocity, CFG) against the diffusers
pipelines' own loop, one PEC iteration of `trainer.train` with the family's preset, the exported LoRA
in a fresh diffusers pipeline and in ComfyUI 0.8.0 ($COMFYUI_PATH), `pec inspect` and the LoRA Loader check."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tiny_models as tm
import torch
from test_backends_real import PROMPTS, _config, _redness

from comfy_pec import PECError
from comfy_pec.lora_format import ARCHITECTURES, inspect_lora, load_lora, lora_key_coverage
from comfy_pec.nodes.lora_check import check_lora, lora_family, model_family
from comfy_pec.sde import scheduler_schedule
from trainer import rewards as reward_registry
from trainer.backends import detect_family, load_backend
from trainer.backends.flux import unpack_latents
from trainer.backends.flux2 import Flux2Backend, Flux2KleinBackend
from trainer.backends.qwenimage import QwenImageBackend
from trainer.backends.random_init import LLM_SPECS, build_llm_pipeline, save_pipeline
from trainer.backends.zimage import ZImageBackend
from trainer.checkpoint import latest_checkpoint, load_state
from trainer.lora import target_regex
from trainer.runlog import read_log
from trainer.train import train

# backend family -> (random-init spec, preset, backend class, LoRA architecture)
FAMILIES = {
    "zimage": ("tiny-zimage", "zimage-turbo-pickscore", ZImageBackend, "zimage"),
    "qwenimage": ("tiny-qwenimage", "qwen-image-pickscore", QwenImageBackend, "qwen-image"),
    "flux2": ("tiny-flux2-dev", "flux2-dev-pickscore", Flux2Backend, "flux2"),
    "flux2-klein": ("tiny-flux2-klein", "flux2-klein-pickscore", Flux2KleinBackend, "flux2-klein"),
}
FLUX2 = ("flux2", "flux2-klein")


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
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])
    if family in FLUX2:  # three stacked text-encoder layers over the whole padded sequence, no pooled
        assert cond.embeds.shape == (3, backend.max_sequence_length, 48) and cond.pooled.shape == (3, 0)
    else:  # real tokens only, padded with zeros; the mask in pooled
        lengths = cond.pooled.sum(1)
        assert cond.embeds.shape == (3, 48, 32) and (lengths > 0).all() and len(set(lengths.tolist())) > 1
        assert cond.embeds[cond.pooled == 0].abs().sum() == 0
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
    if family == "zimage" or family in FLUX2:  # both take our layout
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
        # Z-Image and klein return the VAE latent (klein: batch-norm undone, patches unfolded); dev the tokens.
        return out if family in ("zimage", "flux2-klein") else out.transpose(1, 2).reshape(noise.shape)
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


@pytest.mark.parametrize(
    ("family", "guidance", "distilled"),
    [(f, g, False) for f in FAMILIES for g in (0.0, 3.0)] + [("flux2-klein", 3.0, True)],
)
def test_euler_sampling_is_the_pipeline_loop(model_dirs, family, guidance, distilled):
    """Schedule, layout, timestep convention, velocity sign and the family's CFG rule together: the
    backend's Euler ODE from the same noise ends where the diffusers pipeline does (FLUX.2-klein: the
    undistilled base model with CFG, and a distilled one that ignores the guidance scale)."""
    backend = load_backend(model_dirs[family])
    if family == "flux2-klein":
        backend.pipe.register_to_config(is_distilled=distilled)
    steps = 3
    noise = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
    sigmas = backend.schedule(steps, 32, 32)
    cond = backend.encode_prompts(PROMPTS[:2])
    x = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * backend.velocity(x, float(sigma), cond, guidance)
        expected = _pipeline_latents(backend, family, noise, steps, guidance)
    if family == "flux2-klein":
        mean, std = backend._bn_stats()
        x = unpack_latents(x * std + mean)
    torch.testing.assert_close(x, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", [(32, 32), (1024, 768)])
def test_schedule_is_the_scheduler(model_dirs, family, size):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    backend = load_backend(model_dirs[family])
    scheduler = backend.pipe.scheduler
    seq_len = (size[0] // 4) * (size[1] // 4)  # tiny VAE: 2x down-sampling, then 2x2 patches
    cfg = scheduler.config
    if family in FLUX2:
        mu = compute_empirical_mu(seq_len, 6)
    else:
        mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    sigmas = backend.schedule(6, *size)
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)
    if family == "qwenimage":
        assert abs(float(sigmas[-2]) - 0.02) < 1e-6  # stretched to Qwen-Image's terminal sigma
    with pytest.raises(PECError, match="time_shift_type"):
        scheduler_schedule(6, seq_len, dict(cfg, time_shift_type="linear"))


# ----------------------------------------------------------------------------- one PEC iteration


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
                LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=target_regex(lora.targets))
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
    elif family in FLUX2:  # double blocks' attention and MLPs, the single blocks' linear1 and linear2
        assert {
            "transformer_blocks.0.ff_context.linear_out",
            "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out",
        } <= modules
        assert "transformer_blocks.0.attn.to_out" not in modules  # the double blocks' ModuleList, not adapted
    else:  # both streams' attention and MLPs
        assert {"transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.txt_mlp.net.2"} <= modules


def test_pattern_target_reaches_the_single_blocks_linear2():
    """``single_transformer_blocks.*.attn.to_out`` names the single blocks' output projection (BFL linear2) and not
    the double blocks' ``attn.to_out`` ModuleList; suffix targets keep PEFT's list semantics; the pre-flight counts
    the same modules PEFT adapts."""
    from peft import LoraConfig

    from trainer.lora import target_matches
    from trainer.preflight import lora_param_count

    model = _tiny_flux2()
    names = [n for n, _ in model.named_modules()]
    pattern = "single_transformer_blocks.*.attn.to_out"
    assert [n for n in names if target_matches(n, pattern)] == ["single_transformer_blocks.0.attn.to_out"]
    suffixes = ["to_q", "to_out.0", "ff.linear_in"]
    assert [n for n in names if any(target_matches(n, t) for t in suffixes)] == [
        n for n in names if any(n == t or n.endswith("." + t) for t in suffixes)
    ]
    targets = [*suffixes, pattern]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=target_regex(targets)))
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert "single_transformer_blocks.0.attn.to_out" in adapted and "transformer_blocks.0.attn.to_out" not in adapted
    assert "transformer_blocks.0.attn.to_out.0" in adapted
    count, matched = lora_param_count(_tiny_flux2(), targets, 2)
    assert matched == set(targets)
    assert count == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


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

    def adapted_modules(model):
        return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}

    assert adapted_modules(fresh.transformer) == adapted_modules(adapted.transformer)
    if family in FLUX2:  # the presets' single-block output projection, written as BFL linear2
        assert "diffusion_model.single_blocks.0.linear2.lora_A.weight" in load_lora(run / "lora.safetensors")[0]
        assert "single_transformer_blocks.0.attn.to_out" in adapted_modules(fresh.transformer)
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
    # the keys tell FLUX.2 from FLUX.1, not klein from dev: the header says klein
    assert info.architecture == architecture.removesuffix("-klein") and not info.architecture_mismatch
    assert info.scale_baked and info.notes == []
    _, metadata = load_lora(run / "lora.safetensors")
    assert (metadata["modelspec.architecture"], metadata["ss_base_model_version"]) == ARCHITECTURES[architecture]
    main(["inspect", str(run / "lora.safetensors")])
    assert architecture in capsys.readouterr().out
    tensors = load_lora(run / "lora.safetensors")[0]
    coverage = lora_key_coverage(tensors, tensors)  # a model that has every module: only the family decides
    comfy_class = {"zimage": ["ZImage", "Lumina2"], "qwenimage": ["QwenImage"]}.get(family, ["Flux2", "Flux"])
    lora = lora_family(info)
    assert model_family(comfy_class) == lora == architecture.removesuffix("-klein")
    check_lora(info, coverage, lora)
    with pytest.raises(PECError, match=f"for {lora.upper()} models but the model is flux"):
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


def _comfy_flux2(comfy, transformer):
    """ComfyUI's FLUX.2 model for a tiny diffusers ``Flux2Transformer2DModel``, every weight zero (so the patched
    weights are the LoRA's changes). The config is explicit: ComfyUI 0.8.0 hard-codes 48 heads for FLUX.2."""
    cfg = transformer.config
    unet = dict(
        image_model="flux2",
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        vec_in_dim=None,
        context_in_dim=cfg.joint_attention_dim,
        hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
        mlp_ratio=cfg.mlp_ratio,
        num_heads=cfg.num_attention_heads,
        depth=cfg.num_layers,
        depth_single_blocks=cfg.num_single_layers,
        axes_dim=list(cfg.axes_dims_rope),
        theta=cfg.rope_theta,
        patch_size=1,
        qkv_bias=False,
        guidance_embed=cfg.guidance_embeds,
        txt_ids_dims=[3],
        global_modulation=True,
        mlp_silu_act=True,
        ops_bias=False,
        default_ref_method="index",
        ref_index_scale=10.0,
    )
    config = comfy.supported_models.Flux2(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    model.diffusion_model.load_state_dict(
        {k: torch.zeros_like(v) for k, v in model.diffusion_model.state_dict().items()}
    )
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _expected_bfl_deltas(adapted) -> dict[str, torch.Tensor]:
    """The weight changes of a PEFT-adapted diffusers FLUX.2 transformer, in BFL names: ``scale·B A`` per module,
    q, k, v stacked into the fused qkv (a projection without LoRA contributes zero rows)."""
    from comfy_pec.lora_format import _flux2_bfl_module

    deltas: dict[str, dict[int | None, torch.Tensor]] = {}
    for name, module in adapted.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        bfl, part = _flux2_bfl_module(name, "test")
        deltas.setdefault(bfl, {})[part] = (b @ a) * module.scaling["default"]
    out = {}
    for bfl, parts in deltas.items():
        if None in parts:
            out[bfl] = parts[None]
        else:
            like = next(iter(parts.values()))
            out[bfl] = torch.cat([parts.get(i, torch.zeros_like(like)) for i in range(3)])
    return out


def _check_flux2_in_comfy(comfy, tensors, adapted, caplog) -> int:
    """Every key of a BFL-layout FLUX.2 file loads in ComfyUI and changes exactly the adapter's weights."""
    patcher = _comfy_flux2(comfy, adapted)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(patches) == sum(k.endswith(".lora_A.weight") for k in tensors)
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    state = patcher.model.diffusion_model.state_dict()
    expected = _expected_bfl_deltas(adapted)
    assert {"diffusion_model." + k for k in expected} == {
        k.removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k
    }
    changed = {k.removesuffix(".weight") for k, v in state.items() if v.abs().max() > 0}
    assert changed == set(expected)
    for bfl, delta in expected.items():
        tm.assert_close(state[bfl + ".weight"], delta.detach(), rel=1e-5)
    return len(patches)


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
    diffusers layout, give the adapted model's velocity (FLUX.2: the patched BFL weights are the adapter's)."""
    run, config, adapted = trained[family]
    tensors, _ = load_lora(run / "lora.safetensors")
    if family in FLUX2:
        _check_flux2_in_comfy(comfy, tensors, adapted.transformer, caplog)
        return
    base = load_backend(model_dirs[family])
    patcher = _comfy_model(comfy, family, base.transformer)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
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


# ----------------------------------------------------------------------------- FLUX.2 BFL layout


def _tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**LLM_SPECS["tiny-flux2-klein"].transformer).eval()


# every place a FLUX.2 LoRA can go, the single blocks' linear2 (attn.to_out) included, and q and v without k
_FLUX2_REGEX = (
    r".*(attn\.(to_q|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out|to_qkv_mlp_proj)"
    r"|ff(_context)?\.linear_(in|out)|single_transformer_blocks\.\d+\.attn\.to_out)"
)


@pytest.fixture(scope="module")
def flux2_lora(tmp_path_factory):
    """(PEFT-adapted tiny FLUX.2 transformer, its LoRA saved by save_lora, that file's path), ranks 3 and 5."""
    from peft import LoraConfig

    model = _tiny_flux2()
    model.add_adapter(
        LoraConfig(r=3, lora_alpha=6, target_modules=_FLUX2_REGEX, rank_pattern={"^transformer_blocks.0.attn.to_v": 5})
    )
    tm.randomize_lora(model, seed=4)
    path = tmp_path_factory.mktemp("flux2") / "lora.safetensors"
    from comfy_pec.lora_format import save_lora

    save_lora(model, path, dtype=torch.float32, architecture="flux2")
    return model, path


def _flux2_inputs(seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    from trainer.backends.flux2 import position_ids, text_ids

    return dict(
        hidden_states=torch.randn(1, 16, 128, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 48, generator=g),
        timestep=torch.full((1,), 0.5),
        img_ids=position_ids(1, 4, 4),
        txt_ids=text_ids(1, 5),
    )


def test_flux2_bfl_file_reloads_in_diffusers_exactly(flux2_lora):
    """The BFL file (fused q/k/v of mixed ranks, a missing k, linear2) through diffusers' own FLUX.2 converter
    gives the adapted model's output; the backend's reader gives the same modules."""
    import diffusers

    from comfy_pec.lora_format import flux2_from_bfl

    model, path = flux2_lora
    tensors, metadata = load_lora(path)
    assert all(k.startswith("diffusion_model.") for k in tensors) and "lora_adapter_metadata" not in metadata
    qkv = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert qkv.shape == (3 * 32, 3 + 5)  # q rank 3, v rank 5, no k: zero rows
    assert qkv[32:64].abs().sum() == 0
    assert "diffusion_model.single_blocks.0.linear2.lora_A.weight" in tensors
    assert inspect_lora(path).architecture == "flux2"

    pipe = diffusers.Flux2KleinPipeline(
        transformer=_tiny_flux2(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    with tm.captured_log("diffusers") as messages:
        pipe.load_lora_weights(str(path))
    assert tm.key_warnings(messages) == []
    tm.assert_close(tm.forward(pipe.transformer, _flux2_inputs()), tm.forward(model, _flux2_inputs()), rel=1e-5)
    # flux2_from_bfl (the backend's reader) places the same modules with the same products B A
    converted = flux2_from_bfl(tensors)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
            expected = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            torch.testing.assert_close(b @ a, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.comfyui
def test_flux2_bfl_file_loads_in_comfyui_with_every_key(comfy, flux2_lora, caplog):
    model, path = flux2_lora
    tensors, _ = load_lora(path)
    # img and txt qkv (fused), img and txt proj, four MLP layers, linear1 and linear2
    assert _check_flux2_in_comfy(comfy, tensors, model, caplog) == 10


def test_flux2_diffusers_layout_lora_is_recognised_and_refused_on_flux1(tmp_path):
    """A diffusers-layout FLUX.2 LoRA (as other trainers write it): `pec inspect` names FLUX.2, the LoRA
    Loader check refuses it on a FLUX.1 model and accepts it on FLUX.2; save_lora names a module that has
    no place in the BFL layout."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from comfy_pec.lora_format import save_lora

    model = _tiny_flux2()
    tm.add_random_lora(model, targets=["to_q", "to_k", "ff.linear_in", "to_qkv_mlp_proj"])
    state = {"transformer." + k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    path = tmp_path / "flux2.safetensors"
    save_file(state, str(path))
    info = inspect_lora(path)
    assert info.architecture == "flux2"
    coverage = lora_key_coverage(state, [n for n, _ in model.named_modules()])
    check_lora(info, coverage, model_family(["Flux2", "Flux", "BASE"]))
    with pytest.raises(PECError, match="this LoRA is for FLUX2 models but the model is flux"):
        check_lora(info, coverage, model_family(["Flux", "BASE"]))
    state["transformer.x_embedder.lora_A.weight"] = torch.zeros(2, 128)
    state["transformer.x_embedder.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(PECError, match="'x_embedder' has no place in the original"):
        save_lora(state, tmp_path / "out.safetensors", alpha=4)


@pytest.mark.comfyui
def test_flux2_diffusers_layout_is_not_loaded_by_comfyui(comfy, caplog):
    """Why FLUX.2 files use the BFL layout: ComfyUI 0.8.0 leaves the diffusers-layout MLP and single-block keys
    unloaded (the attention keys it maps through its FLUX.1 table)."""
    from peft.utils import get_peft_model_state_dict

    model = _tiny_flux2()
    tm.add_random_lora(model, targets=["to_q", "ff.linear_in", "ff_context.linear_out", "to_qkv_mlp_proj"])
    tensors = {"transformer." + k: v for k, v in get_peft_model_state_dict(model).items()}
    patcher = _comfy_flux2(comfy, model)
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    not_loaded = " ".join(r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage())
    for module in ("ff.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj"):
        assert module in not_loaded
    assert "attn.to_q." not in not_loaded
