"""The embedded tiny SD3 model and the toy perceptual encoder: tokenizer, files, loading, training
smoke runs, encoder interface and probe, and (slow) the shipped model's acceptance figures."""

from __future__ import annotations

import argparse

import pytest
import torch

from comfy_pec.encoders import ASSETS_DIR, PerceptualEncoder, ToyEncoder, load_encoder
from trainer.backends.base import read_defaults
from trainer.backends.random_init import build_pipeline, save_pipeline
from trainer.toy.model import (
    DEFAULT_MODEL_DIR,
    EMBEDDED_SPEC,
    PEC_DEFAULTS,
    VAE_CONFIG,
    load_pipeline,
    safetensors_bytes,
)
from trainer.world.scenes import all_captions, heldout_prompts
from trainer.world.vocabulary import MODEL_MAX_LENGTH, VOCABULARY, build_tokenizer, write_tokenizer_files

MB = 1024 * 1024


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("toy")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def test_every_grammar_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(tmp_path)
    built = build_tokenizer()
    from_files = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file))
    for word in VOCABULARY:
        ids = built(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, built.convert_ids_to_tokens(ids))
        assert from_files(word, add_special_tokens=False).input_ids == ids
    for caption in all_captions():  # fits with BOS and EOS, one token per word
        ids = built(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= MODEL_MAX_LENGTH


def test_unknown_words_fall_back_to_characters():
    tok = build_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("A Red zebra-star!").input_ids)
    assert tokens[:3] == ["<|startoftext|>", "a</w>", "red</w>"]
    assert tokens[3:7] == ["z", "e", "b", "r"] and "star</w>" in tokens
    assert tokens[-1] == "<|endoftext|>"
    padded = tok("x" * 40, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    assert len(padded.input_ids) == MODEL_MAX_LENGTH


# ----------------------------------------------------------------------------------------------
# Pipeline files
# ----------------------------------------------------------------------------------------------


def test_shipped_pipeline_loads_offline():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(DEFAULT_MODEL_DIR), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert pipe.text_encoder_3 is None
    assert pipe.tokenizer("a red star").input_ids == build_tokenizer()("a red star").input_ids
    assert abs(pipe.vae.config.scaling_factor - 1.0) > 1e-3  # calibrated on data
    defaults = read_defaults(str(DEFAULT_MODEL_DIR), PEC_DEFAULTS)
    assert defaults["resolution"] == 64 and defaults["max_sequence_length"] == 0


def test_shipped_weights_are_small():
    assert 0 < safetensors_bytes(DEFAULT_MODEL_DIR) <= 20 * MB
    files = {p.name for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()}
    assert "model_index.json" in files and "pec.json" in files
    assert (ASSETS_DIR / "toy_encoder.safetensors").stat().st_size <= 5 * MB


def test_save_reload_reproduces_outputs(tmp_path):
    pipe = build_pipeline(EMBEDDED_SPEC, seed=3)
    save_pipeline(pipe, tmp_path, PEC_DEFAULTS)
    again = load_pipeline(tmp_path)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, VAE_CONFIG["latent_channels"], 16, 16, generator=gen)
    with torch.no_grad():
        outs = []
        for p in (pipe, again):
            embeds, _, pooled, _ = p.encode_prompt(
                ["a red star", ""], None, None, do_classifier_free_guidance=False, max_sequence_length=0
            )
            v = p.transformer(
                latents, timestep=torch.tensor([500.0, 900.0]), encoder_hidden_states=embeds, pooled_projections=pooled
            ).sample
            outs.append((embeds, pooled, v, p.vae.decode(latents).sample))
    assert outs[0][0].shape == (2, MODEL_MAX_LENGTH, 128)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pretrain_smoke_writes_a_loadable_pipeline(tmp_path):
    from trainer.backends.sd3 import SD3Backend
    from trainer.sampling import sample_images
    from trainer.toy.pretrain import pretrain

    report = pretrain(
        tmp_path / "model",
        n_images=32,
        vae_steps=2,
        vae_batch_size=4,
        steps=2,
        batch_size=4,
        warmup=1,
        workers=1,
        progress=False,
    )
    assert set(report["time_s"]) == {"data", "vae", "latents", "flow", "save", "total"}
    backend = SD3Backend.from_pretrained(str(tmp_path / "model"))
    assert backend.defaults["max_sequence_length"] == 0
    images = sample_images(backend, ["a red star"], [0], num_steps=2, progress=False)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()

    # a second sitting: same VAE and latent scale, the flow model trained further
    again = pretrain(
        tmp_path / "more",
        init_from=tmp_path / "model",
        n_images=32,
        steps=2,
        batch_size=4,
        warmup=1,
        workers=1,
        progress=False,
    )
    first, second = load_pipeline(tmp_path / "model"), load_pipeline(tmp_path / "more")
    for a, b in zip(first.vae.state_dict().values(), second.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert first.vae.config.scaling_factor == second.vae.config.scaling_factor
    assert not torch.equal(first.transformer.proj_out.weight, second.transformer.proj_out.weight)
    assert again["recipe"]["continues"] == report["recipe"]
    assert read_defaults(str(tmp_path / "more"), PEC_DEFAULTS)["pretrain"]["continues"]["vae_steps"] == 2


def test_cli_registers_toy_commands():
    from trainer.toy.cli import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["toy", "pretrain", "--steps", "5", "--out", "x"])
    assert (args.steps, args.out, args.vae_steps) == (5, "x", None)
    args = parser.parse_args(["toy", "train-encoder", "--lr", "0.01"])
    assert args.lr == 0.01 and callable(args.func)


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def test_encoder_interface(encoder):
    assert isinstance(encoder, PerceptualEncoder) and encoder.name == "toy"
    images = torch.rand(3, 3, 64, 64)
    feats = encoder(images)
    assert feats.shape == (3, encoder.dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    # ComfyUI IMAGE layout [B, H, W, 3] and a single unbatched image give the same features
    torch.testing.assert_close(encoder(images.permute(0, 2, 3, 1)), feats)
    torch.testing.assert_close(encoder(images[0]), feats[:1])
    assert encoder(torch.rand(2, 96, 96, 3)).shape == (2, encoder.dim)  # resized in torch
    raw = load_encoder("toy", normalize=False)(images)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), feats)


def test_encoder_is_differentiable_and_deterministic(encoder):
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    encoder(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    x = torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1)
    f = encoder(x)
    assert torch.equal(f[0], f[1])


def test_encoder_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = ToyEncoder().eval()
    path = model.save_pretrained(tmp_path / "enc.safetensors")
    again = load_encoder("toy", path=path)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(again(x), model(x))


def test_encoder_linear_probe_predicts_shape_and_colour(encoder):
    from trainer.toy.encoder_train import probe_report

    report = probe_report(encoder, seed=7, n_train=1200, n_test=600, workers=1)
    assert report["shape_accuracy"] >= 0.9, report
    assert report["colour_accuracy"] >= 0.9, report


def test_encoder_separates_free_attributes_of_one_prompt(encoder):
    """Vendi is meaningful: images of one prompt spread out, much more than noise-level copies."""
    from comfy_pec.diversity import vendi_score
    from trainer.toy.evaluate import data_images

    data = data_images("a red circle", 32, seed=3)
    spread = float(vendi_score(encoder(data)))
    copies = float(vendi_score(encoder(data[:1].repeat(32, 1, 1, 1))))
    assert copies == pytest.approx(1.0, abs=1e-3)
    assert spread > 3.0


# ----------------------------------------------------------------------------------------------
# Acceptance of the shipped model (slow)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue #3 open: the shipped 16-channel model (10k flow steps) reaches 0.42 held-out adherence "
    "(colours right, shapes blobby), target 0.8; strict, so a model that passes turns this red until the "
    "marker is removed",
)
def test_shipped_model_adherence_and_diversity(encoder):
    from trainer.toy.evaluate import evaluate_toy_model

    report = evaluate_toy_model(prompts=heldout_prompts()[:5], n=16, seed=0, encoder=encoder, progress=False)
    assert report["mean_adherence"] >= 0.75, report
    assert report["min_vendi_ratio"] >= 0.45, report
