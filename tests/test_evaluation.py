"""`pec eval` on a tiny random SD3 pipeline: files, resume, LoRA identity, metric values, CLI + compare."""

import csv
import json

import pytest
import torch

import trainer.evaluation as evaluation
from comfy_pec import PECError
from comfy_pec.diversity import feature_variance, vendi_score
from comfy_pec.encoders import ToyEncoder, load_encoder
from comfy_pec.lora_format import save_lora
from trainer.backends.random_init import build_pipeline, save_pipeline
from trainer.cli import main
from trainer.evaluation import image_name, load_images, run_eval
from trainer.rewards import REWARDS
from trainer.toy.model import EMBEDDED_SPEC, PEC_DEFAULTS

PROMPTS = ["a red circle", "a blue square on the left"]
REWARD_NAMES = ["toy_adherence", "toy_preference"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random pipeline (2 steps), a random toy encoder and a random LoRA, saved to disk."""
    root = tmp_path_factory.mktemp("eval_world")
    pipe = build_pipeline(
        EMBEDDED_SPEC.with_overrides(transformer={"num_layers": 2}), seed=3
    )  # 2 blocks: fast on a CPU
    save_pipeline(pipe, root / "model", {**PEC_DEFAULTS, "num_steps": 2, "eval_num_steps": 2})
    torch.manual_seed(1)
    encoder = ToyEncoder().eval()
    encoder_path = encoder.save_pretrained(root / "enc" / "toy_encoder.safetensors")
    modules = [f"transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_q", "to_v")]
    tensors = {}
    for name in modules:
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, 128) * 0.3
        tensors[f"{name}.lora_B.weight"] = torch.randn(128, 4) * 0.3
    lora = root / "pec" / "lora.safetensors"
    lora.parent.mkdir()
    save_lora(tensors, lora, alpha=4, dtype=torch.float32)
    return {
        "model": str(root / "model"),
        "encoder": f"toy={encoder_path}",
        "encoder_path": encoder_path,
        "lora": lora,
        "out": root / "evals",
    }


def _eval(world, loras=(), per_prompt=3, **kwargs):
    options = {"rewards": REWARD_NAMES, "encoders": [world["encoder"]], "batch_size": 4, "progress": False, **kwargs}
    return run_eval(world["model"], list(loras), PROMPTS, per_prompt, world["out"], **options)


@pytest.fixture(scope="module")
def base_dir(world):
    return _eval(world)


def test_eval_writes_images_manifest_and_metrics(base_dir):
    manifest = json.loads((base_dir / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["seeds"] == [1000, 1001, 1002]
    assert sorted(manifest["images"]) == sorted(image_name(i, s) for i in range(2) for s in (1000, 1001, 1002))
    assert all((base_dir / "images" / f).is_file() for f in manifest["images"])
    sampler = manifest["identity"]["sampler"]
    assert sampler["num_steps"] == 2 and sampler["sde"] == "ode" and sampler["noise_level"] == 0.0
    assert base_dir.name.startswith("model-")

    metrics = json.loads((base_dir / "metrics.json").read_text())
    assert metrics["quality"] == REWARD_NAMES
    assert metrics["diversity"] == ["vendi/toy", "variance/toy"] and metrics["extra"] == ["variance_norm/toy"]
    assert len(metrics["per_prompt"]) == 2 and metrics["samples_per_prompt"] == 3
    with open(base_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["prompt_idx"] for r in rows] == ["0", "1", "mean"]
    assert float(rows[-1]["vendi/toy"]) == pytest.approx(metrics["mean"]["vendi/toy"], rel=1e-5)


def test_metrics_equal_a_direct_recomputation(base_dir, world):
    metrics = json.loads((base_dir / "metrics.json").read_text())
    files = [base_dir / "images" / image_name(i, s) for i in range(2) for s in (1000, 1001, 1002)]
    images = load_images(files)
    flat_prompts = [p for p in PROMPTS for _ in range(3)]
    with torch.no_grad():
        feats = load_encoder("toy", normalize=False, path=world["encoder_path"])(images).reshape(2, 3, -1)
    expected = {
        "vendi/toy": vendi_score(feats),
        "variance/toy": feature_variance(feats),
        "variance_norm/toy": feature_variance(feats, normalize=True),
        **{n: REWARDS[n]()(images, flat_prompts).reshape(2, 3).mean(1) for n in REWARD_NAMES},
    }
    for name, values in expected.items():
        got = [row[name] for row in metrics["per_prompt"]]
        assert got == pytest.approx(values.tolist(), rel=1e-4, abs=1e-6), name
        assert metrics["mean"][name] == pytest.approx(float(values.mean()), rel=1e-4, abs=1e-6)


def test_a_second_call_reuses_the_images_and_a_larger_n_samples_only_the_new(base_dir, world, monkeypatch):
    calls = []
    real = evaluation.sample_images

    def counting(backend, prompts, seeds, **kwargs):
        calls.append(list(seeds))
        return real(backend, prompts, seeds, **kwargs)

    monkeypatch.setattr(evaluation, "sample_images", counting)
    before = json.loads((base_dir / "metrics.json").read_text())["mean"]
    assert _eval(world) == base_dir
    assert calls == [] and json.loads((base_dir / "metrics.json").read_text())["mean"] == before

    (base_dir / "images" / image_name(1, 1001)).unlink()  # a lost file is drawn again
    _eval(world, per_prompt=4)
    assert sorted(s for batch in calls for s in batch) == [1001, 1003, 1003]


def test_a_lora_is_a_separate_eval_with_its_hash_in_the_manifest(base_dir, world):
    lora_dir = _eval(world, loras=[(world["lora"], 1.0)], per_prompt=3)
    assert lora_dir != base_dir and lora_dir.name.startswith("model+pec-")
    manifest = json.loads((lora_dir / "manifest.json").read_text())
    (entry,) = manifest["identity"]["loras"]
    assert entry["sha256"] == evaluation.file_sha256(world["lora"]) and entry["scale"] == 1.0
    assert manifest["identity_hash"] != json.loads((base_dir / "manifest.json").read_text())["identity_hash"]
    name = image_name(0, 1000)
    assert not torch.equal(load_images([lora_dir / "images" / name]), load_images([base_dir / "images" / name]))
    with pytest.raises(PECError, match="another model, LoRA or sampler"):
        _eval(world, loras=[(world["lora"], 0.5)], name=lora_dir.name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"per_prompt": 1}, "per_prompt must be >= 2"),
        ({"loras": [("a.safetensors", 1.0), ("b.safetensors", 1.0)]}, "stack of LoRAs"),
        ({"loras": [("missing.safetensors", 1.0)]}, "LoRA file not found"),
        ({"sde": "euler"}, "unknown sampler"),
        ({"rewards": ["pickscore_v9"]}, "unknown reward"),
    ],
)
def test_bad_input_is_a_clear_error(world, kwargs, match):
    with pytest.raises(PECError, match=match):
        _eval(world, **kwargs)


def test_cli_eval_then_compare(base_dir, world, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = main(
        [
            "eval",
            "--model",
            world["model"],
            "--base",
            "--lora",
            str(world["lora"]),
            "--prompts",
            str(prompts),
            "--per-prompt",
            "3",
            "--rewards",
            ",".join(REWARD_NAMES),
            "--encoders",
            world["encoder"],
            "--batch-size",
            "4",
            "--out",
            str(world["out"]),
        ]
    )
    assert code == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(world["out"]), "--out", str(out), "--grid-seeds", "3"]) == 0
    table = (out / "table.md").read_text()
    assert "| model |" in table and "| model+pec |" in table and "Overall" in table
    for name in ("table.csv", "tradeoff.png", "grids.png", "similarity.png"):
        assert (out / name).stat().st_size > 0
    assert main(["eval", "--model", world["model"], "--per-prompt", "3"]) == 2  # real model needs --prompts
    assert "pass --prompts" in capsys.readouterr().err
