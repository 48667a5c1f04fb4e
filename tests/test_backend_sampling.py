"""SD3 backend and the shared sampling loop, on a freshly built tiny SD3 pipeline saved to disk."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_pec import PECError
from comfy_pec.lora_format import save_lora
from comfy_pec.sde import base_sigmas, sd3_schedule
from trainer.backends import detect_family, load_backend
from trainer.backends.base import PromptEmbeds
from trainer.backends.random_init import build_pipeline, save_pipeline
from trainer.cli import main
from trainer.sampling import denoise, sample_images, seeded_noise
from trainer.toy.model import EMBEDDED_SPEC, PEC_DEFAULTS, VAE_CONFIG

#: one latent of a 64x64 image: [C, 16, 16]
LATENT = (VAE_CONFIG["latent_channels"], 16, 16)
PROMPTS = ["a red circle", "a blue square on the left", "a green star and a cyan ring"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    save_pipeline(
        build_pipeline(EMBEDDED_SPEC, seed=3),
        path,
        {**PEC_DEFAULTS, "num_steps": 4, "eval_num_steps": 4, "guidance_scale": 2.5},
    )
    return str(path)


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend(model_dir)


def test_loads_through_the_real_path_with_model_defaults(backend, model_dir):
    assert detect_family(model_dir) == "sd3"
    assert backend.family == "sd3" and backend.defaults["num_steps"] == 4 and backend.defaults["guidance_scale"] == 2.5
    assert not any(p.requires_grad for p in backend.transformer.parameters())
    assert backend.latent_shape(64, 64) == LATENT
    with pytest.raises(PECError, match="multiple of"):
        backend.latent_shape(60, 64)


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(PECError, match="model_index.json"):
        load_backend(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(PECError, match="not supported"):
        load_backend(str(tmp_path))


def test_velocity_with_and_without_cfg(backend):
    torch.manual_seed(0)
    x = torch.randn(3, *LATENT)
    cond = backend.encode_prompts(PROMPTS)
    assert cond.embeds.shape[0] == 3 and cond.pooled.shape == (3, 64)
    with torch.no_grad():
        v = backend.velocity(x, 0.7, cond)
        direct = backend.transformer(
            hidden_states=x,
            timestep=torch.full((3,), 700.0),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
        torch.testing.assert_close(v, direct)
        v_u = backend.velocity(x, 0.7, backend.empty_embeds(3))
        v_cfg = backend.velocity(x, 0.7, cond, guidance_scale=3.0)
        torch.testing.assert_close(v_cfg, v_u + 3.0 * (v - v_u), rtol=1e-5, atol=1e-5)


def test_ode_sampling_matches_the_diffusers_pipeline(backend):
    """Our loop with noise level 0 is diffusers' SD3 Euler sampler on the same sigmas."""
    steps, g = 4, 2.5
    noise = seeded_noise((2, *LATENT), [torch.Generator().manual_seed(s) for s in (5, 6)])
    ours, _ = denoise(
        backend,
        noise,
        backend.encode_prompts(PROMPTS[:2]),
        sd3_schedule(steps, shift=backend.defaults["shift"]),
        guidance_scale=g,
        uncond=backend.empty_embeds(2),
    )
    with torch.no_grad():
        ref = backend.pipe(
            prompt=PROMPTS[:2],
            num_inference_steps=steps,
            sigmas=base_sigmas(steps).tolist(),
            guidance_scale=g,
            latents=noise.clone(),
            output_type="latent",
            max_sequence_length=backend.max_sequence_length,
        ).images
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_images_do_not_depend_on_batching(backend):
    one = sample_images(backend, PROMPTS[:1], [11], batch_size=1, progress=False)
    three = sample_images(backend, PROMPTS, [11, 12, 13], batch_size=3, progress=False)
    torch.testing.assert_close(one[0], three[0], rtol=1e-4, atol=1e-5)
    sde_a = sample_images(backend, PROMPTS, [1, 2, 3], noise_level=0.7, progress=False)
    sde_b = sample_images(backend, PROMPTS[::-1], [3, 2, 1], noise_level=0.7, batch_size=1, progress=False)
    torch.testing.assert_close(sde_a, sde_b.flip(0), rtol=1e-4, atol=1e-5)
    assert one.shape == (1, 3, 64, 64) and 0 <= float(one.min()) and float(one.max()) <= 1


def test_rollout_records_only_stochastic_steps(backend):
    cond = backend.encode_prompts(PROMPTS)
    sigmas = sd3_schedule(5, shift=1.0)
    mask = torch.tensor([False, True, True, False, False])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with torch.no_grad():
        x, records = denoise(
            backend,
            seeded_noise((3, *LATENT), gens),
            cond,
            sigmas,
            noise_level=0.7,
            stochastic=mask,
            generators=gens,
            record=True,
        )
    assert [r.index for r in records] == [1, 2]
    for r in records:
        assert r.log_prob.shape == (3,) and torch.isfinite(r.log_prob).all()
    assert torch.equal(records[0].next_latents, records[1].latents)  # consecutive SDE steps chain
    assert torch.isfinite(x).all()


def test_lora_loading_checks_the_base_model(backend, model_dir, tmp_path):
    from peft import LoraConfig

    donor = build_pipeline(EMBEDDED_SPEC, seed=3).transformer
    donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    good = tmp_path / "good.safetensors"
    save_lora(donor, good, dtype=torch.float32)
    x, t = torch.randn(1, *LATENT), torch.full((1,), 500.0)
    fresh = load_backend(model_dir)
    cond = fresh.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        before = fresh.velocity(x, 0.5, cond)
        fresh.load_lora(str(good))
        after = fresh.velocity(x, 0.5, cond)
        ref = donor(
            hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
        ).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-5)

    wrong_spec = EMBEDDED_SPEC.with_overrides(transformer={"attention_head_dim": 16, "caption_projection_dim": 96})
    wrong = build_pipeline(wrong_spec, seed=3).transformer
    wrong.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    bad = tmp_path / "wrong_base.safetensors"
    save_lora(wrong, bad)
    with pytest.raises(PECError, match="another base model"):
        load_backend(model_dir).load_lora(str(bad))


def test_pec_sample_cli_writes_a_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(
        [
            "sample",
            "--model",
            model_dir,
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--seeds",
            "0-2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--upscale",
            "1",
        ]
    )
    assert code == 0 and out.is_file()
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > 2 * 64 and grid.shape[1] >= 3 * 64
    assert main(["sample", "--model", model_dir, "--out", str(out)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_prompt_embeds_helpers():
    e = PromptEmbeds(torch.arange(6.0).reshape(2, 3, 1), torch.arange(2.0).reshape(2, 1))
    r = e.repeat(3)
    assert len(r) == 6 and r.pooled.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert len(PromptEmbeds.cat([e, r])) == 8 and len(r.select(slice(0, 2))) == 2
