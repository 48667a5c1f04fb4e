"""The fixed probe of the paradox (trainer.probe): deterministic, constant policy entropy, exact on resume."""

import shutil

import torch
from test_trainer import model_dir, tiny_overrides  # noqa: F401  (model_dir is a fixture)

from trainer.backends import load_backend
from trainer.checkpoint import complete_checkpoints
from trainer.config import load_config
from trainer.probe import Probe, run_probe
from trainer.runlog import read_log, read_probes
from trainer.train import train

PROBE = {"probe.every": 2, "probe.prompts": 1, "probe.seeds": [0, 1, 2], "probe.steps": [0, 1]}


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "time_probe"} for r in rows]


def test_a_probe_is_deterministic(model_dir):  # noqa: F811
    from comfy_pec.encoders import load_encoder
    from trainer.rollout import RolloutSettings

    backend = load_backend(model_dir)
    d = backend.defaults
    sigmas = backend.schedule(d["num_steps"], d["resolution"], d["resolution"])
    settings = RolloutSettings("flow_sde", d["guidance_scale"], d["resolution"], 4, "mean", sigmas, d["noise_level"])
    encoder = load_encoder("toy", path=f"{model_dir}/encoder/toy_encoder.safetensors")
    probe = Probe(["a red circle", "a blue star"], [0, 1, 2], [0, 1], every=1)
    first, second = (run_probe(probe, 0, backend, encoder, settings) for _ in range(2))
    assert first == second
    assert first["probe_steps"] == [0, 1] and first["vendi"] >= 1.0 and first["feature_variance"] > 0


def test_probe_rows_keep_the_policy_entropy_and_resume_exactly(model_dir, tmp_path):  # noqa: F811
    whole = tmp_path / "whole"
    train(load_config("demo", None, tiny_overrides(model_dir, whole, **PROBE)))
    probes = read_probes(whole)
    assert [p["iteration"] for p in probes] == [0, 2, 3]  # every 2 iterations, and after the last
    assert len({p["policy_entropy"] for p in probes}) == 1  # the schedule's, not the policy's
    assert [r["iteration"] for r in read_log(whole)] == [0, 1, 2]  # training rows apart from probe rows

    # What a kill right after the first checkpoint leaves, then the same run again: it resumes.
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    for folder in complete_checkpoints(killed)[1:]:
        shutil.rmtree(folder)
    (killed / "lora.safetensors").unlink()
    train(load_config("demo", None, tiny_overrides(model_dir, killed, **PROBE)))
    assert _without_time(read_probes(killed)) == _without_time(probes)
    whole_lora = torch.load(complete_checkpoints(whole)[-1] / "state.pt", weights_only=False)["lora"]
    resumed_lora = torch.load(complete_checkpoints(killed)[-1] / "state.pt", weights_only=False)["lora"]
    assert all(torch.equal(whole_lora[k], resumed_lora[k]) for k in whole_lora)
