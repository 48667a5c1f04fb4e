"""``pec train --dry-run`` and the offline pre-flight on the new families (Z-Image, Qwen-Image, FLUX.2 dev and klein).

Offline, each shipped preset prints its plan — family, the missing model named, the memory/FLOP estimate from the
published configs — and exits 1; ``pec train`` stops within seconds with one line; a tiny saved Z-Image pipeline
plans with exit 0. The published-size configs behind the estimates count to the published parameter counts.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import cli
from trainer.backends.random_init import LLM_SPECS, build_llm_pipeline, save_pipeline
from trainer.config import load_config
from trainer.preflight import check_before_loading, estimate

ROOT = Path(__file__).resolve().parent.parent
#: preset -> (family, hub id of its model)
PRESETS = {
    "zimage-turbo-pickscore": ("zimage", "Tongyi-MAI/Z-Image-Turbo"),
    "qwen-image-pickscore": ("qwenimage", "Qwen/Qwen-Image"),
    "flux2-dev-pickscore": ("flux2", "black-forest-labs/FLUX.2-dev"),
    "flux2-klein-pickscore": ("flux2-klein", "black-forest-labs/FLUX.2-klein-4B"),
}
B = 1e9
#: (preset, model.path override) -> published parameter counts (transformer, text encoder), each model's card:
#: Z-Image-Turbo "6B" with Qwen3-4B (4.0 B); Qwen-Image "20B MMDiT" with Qwen2.5-VL-7B-Instruct (8.29 B with its
#: vision tower and LM head); FLUX.2-dev "32 billion parameter" with Mistral-Small-3.1/3.2 "24B"; FLUX.2-klein
#: "4B" / "9B" with Qwen3-4B (4.0 B) / Qwen3-8B (8.2 B).
PUBLISHED = {
    ("zimage-turbo-pickscore", None): (6 * B, 4.0 * B),
    ("qwen-image-pickscore", None): (20 * B, 8.29 * B),
    ("flux2-dev-pickscore", None): (32 * B, 24 * B),
    ("flux2-klein-pickscore", None): (4 * B, 4.0 * B),
    ("flux2-klein-pickscore", "black-forest-labs/FLUX.2-klein-9B"): (9 * B, 8.2 * B),
}
#: preset -> (image tokens, text tokens, CFG branches): 2x2 latent pixels per token at the preset's resolution
#: over an 8x VAE (512 px: 32x32; klein's 384 px: 24x24), max_sequence_length 512 text tokens; Qwen-Image's
#: true CFG batches both branches, FLUX.2's guidance is distilled, Z-Image-Turbo runs at guidance 0.
TOKENS = {
    "zimage-turbo-pickscore": (1024, 512, 1),
    "qwen-image-pickscore": (1024, 512, 2),
    "flux2-dev-pickscore": (1024, 512, 1),
    "flux2-klein-pickscore": (576, 512, 1),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_offline_dry_run_plan_names_family_and_missing_model(preset, capsys):
    family, hub_id = PRESETS[preset]
    assert cli.main(["train", "--preset", preset, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert f"family {family};" in out and f"model                  {hub_id}  [missing]" in out
    assert "MISSING: model " in out and "NOT READY" in out
    assert "estimate (from the configs, not measured): peak GPU memory ~" in out and "s at 396 TFLOP/s" in out
    assert "none for family" not in out


@pytest.mark.parametrize(("preset", "path"), sorted(PUBLISHED, key=str))
def test_estimate_counts_the_published_sizes(preset, path):
    """The meta-device transformer and text encoder of each published config within 5 % of the published size; the
    token count and CFG branches as the diffusers pipeline and transformer make them; memory and time plausible."""
    overrides = [f"model.path={path}"] if path else []
    config = load_config(preset, None, overrides)
    est = estimate(config, check_before_loading(config))
    transformer, text = PUBLISHED[preset, path]
    assert est.params["transformer"] == pytest.approx(transformer, rel=0.05)
    assert est.params["text_encoder"] == pytest.approx(text, rel=0.05)
    assert 50e6 < est.params["vae"] < 0.2 * B and est.params["reward pickscore"] == pytest.approx(0.99 * B, rel=0.02)
    image, text_tokens, branches = TOKENS[preset]
    assert est.tokens == image + text_tokens
    assert f"micro-batch {config.train.batch_size} x {branches} branch(es)" in est.notes[1]
    # bf16 transformer + float32 VAE and PickScore (text encoder offloaded), + LoRA states, + activations
    assert est.weights == pytest.approx(2 * est.params["transformer"] + 4 * (est.params["vae"] + 0.99 * B), rel=0.01)
    assert est.weights + est.lora_states < est.peak < est.weights + est.lora_states + 40 * 2**30
    assert 10 < est.seconds < 5 * 3600


def test_estimate_with_cfg_doubles_the_batch():
    """Z-Image runs both CFG branches in one forward when guidance is above 0 (its TOKEN_MODELS entry)."""
    base = load_config("zimage-turbo-pickscore", None, [])
    cfg = load_config("zimage-turbo-pickscore", None, ["sampling.guidance_scale=4.0"])
    plain, guided = (estimate(c, check_before_loading(c)) for c in (base, cfg))
    assert guided.activations == 2 * plain.activations and guided.flops == pytest.approx(2 * plain.flops)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shipped_preset_offline_stops_fast_with_one_line(preset):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--preset", preset],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode != 0 and seconds < 30, (seconds, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local hub cache" in lines[0] and "--set model.path" in lines[0], lines


def test_dry_run_on_a_tiny_zimage_pipeline(tmp_path, capsys):
    import tiny_reward_models

    model = save_pipeline(
        build_llm_pipeline("tiny-zimage", seed=3), tmp_path / "zimage", LLM_SPECS["tiny-zimage"].defaults
    )
    clip = tiny_reward_models.save_tiny_clip(tmp_path / "clip")
    args = ["--set", f"model.path={model}", "--set", f"rewards=[{{name: pickscore, path: {clip}}}]"]
    args += ["--set", f"pec.encoder_path={clip}", "--set", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(["train", "--preset", "zimage-turbo-pickscore", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "family zimage;" in out and f"{model}/transformer" in out and "ready: everything is available" in out
    assert not (tmp_path / "run").exists()
