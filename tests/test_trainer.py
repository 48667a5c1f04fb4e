"""`pec train` end to end on a tiny randomly initialised SD3 pipeline: logs, checkpoints, exact resume,
NaN rewards, LoRA export and report."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from comfy_pec.encoders import ToyEncoder
from comfy_pec.lora_format import inspect_lora, load_lora
from comfy_pec.sde import stochastic_steps
from trainer import rewards as reward_registry
from trainer.backends import load_backend
from trainer.backends.random_init import build_pipeline, save_pipeline
from trainer.checkpoint import complete_checkpoints
from trainer.config import load_config
from trainer.distributed import SINGLE_PROCESS, Parallel
from trainer.grpo import group_advantages
from trainer.lora import add_lora
from trainer.methods import build_methods
from trainer.rollout import RolloutSettings, Schedule, group_initial_seeds, rollout
from trainer.runlog import read_log
from trainer.toy.model import EMBEDDED_SPEC, PEC_DEFAULTS
from trainer.train import TrainingError, train, update_settings
from trainer.update import update

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    save_pipeline(build_pipeline(EMBEDDED_SPEC, seed=7), path, {**PEC_DEFAULTS, "num_steps": 4, "eval_num_steps": 4})
    torch.manual_seed(0)
    ToyEncoder().save_pretrained(path / "encoder" / "toy_encoder.safetensors")  # random weights: tests the code path
    return str(path)


def tiny_overrides(model_dir, run_dir, **extra):
    values = {
        "model.path": model_dir,
        "run.dir": str(run_dir),
        "run.progress": False,
        "run.tensorboard": "off",
        "pec.encoder_path": str(Path(model_dir) / "encoder" / "toy_encoder.safetensors"),
        "train.iterations": 3,
        "train.prompts_per_iteration": 2,
        "train.group_size": 4,
        "train.batch_size": 4,
        "sampling.window.size": 2,
        "sampling.window.start_max": 1,
        "checkpoint.every": 1,
        "report.grid_prompts": 1,
        "report.grid_seeds": [0, 1],
        **extra,
    }
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]


def test_shared_initial_noise_gives_a_group_one_start_and_different_endings(model_dir, tmp_path):
    seeds = torch.tensor([11, 12, 13, 14])
    assert group_initial_seeds(seeds, 2, shared=False) is None
    init = group_initial_seeds(seeds, 2, shared=True)
    assert init.tolist() == [11, 11, 13, 13]
    backend = load_backend(model_dir)
    cfg = load_config("demo", None, tiny_overrides(model_dir, tmp_path / "run"))
    res, steps = backend.defaults["resolution"], backend.defaults["num_steps"]
    sigmas = backend.schedule(steps, res, res)
    settings = RolloutSettings(cfg.sampling.sde, 3.0, res, cfg.train.batch_size, "mean", sigmas, 0.7)
    ro = rollout(
        backend, ["a red circle"] * 4, seeds, Schedule(sigmas, stochastic_steps("all", steps), 0.7), settings, init
    )
    start = ro.latents[:, 0]  # the first step is trained: its input is the initial noise
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    assert not torch.equal(ro.next_latents[0, 0], ro.next_latents[1, 0])  # each sample draws its own SDE noise


def lora_tensors(run_dir):
    return load_lora(Path(run_dir) / "lora.safetensors")[0]


def test_pec_run_writes_everything_and_policy_entropy_is_constant(model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        "demo", None, tiny_overrides(model_dir, run, **{"sampling.window.rule": "all", "train.kl_beta": 0.05})
    )
    train(cfg)
    for name in (
        "config.yaml",
        "log.jsonl",
        "lora.safetensors",
        "report.md",
        "curves.png",
        "grid_before.png",
        "grid_after.png",
    ):
        assert (run / name).is_file(), name
    rows = read_log(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for key in (
        "reward_mean",
        "reward_std",
        "policy_entropy",
        "perceptual_entropy",
        "vendi",
        "kl",
        "clip_frac",
        "ratio_mean",
        "time_rollout",
        "time_update",
        "groups_zero_std",
    ):
        assert key in rows[-1], key
    # Paper Property 1: the closed-form policy entropy does not depend on the network.
    assert len({r["policy_entropy"] for r in rows}) == 1
    assert abs(rows[0]["ratio_mean"] - 1) < 1e-3  # rollout and update see the same policy
    info = inspect_lora(run / "lora.safetensors")
    assert info.provenance["method"] == "pec" and info.provenance["global_step"] == 3 and info.scale_baked
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]  # keep=2
    assert "with the LoRA" in (run / "report.md").read_text()


def _cli_train(config_file):
    """`pec train --config FILE` in a fresh interpreter, so every run of the comparison starts alike."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", str(config_file)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _config_file(model_dir, run_dir, tmp_path):
    cfg = load_config(
        "demo", None, tiny_overrides(model_dir, run_dir, **{"train.iterations": 4, "pec.method": "pcvae"})
    )
    path = tmp_path / f"{Path(run_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_gives_a_bitwise_identical_lora(model_dir, tmp_path):
    whole = _cli_train(_config_file(model_dir, tmp_path / "whole", tmp_path))
    assert whole.wait() == 0, whole.stderr.read()
    reference = lora_tensors(tmp_path / "whole")

    killed = tmp_path / "killed"
    config_file = _config_file(model_dir, killed, tmp_path)
    proc = _cli_train(config_file)
    marker = killed / "checkpoints" / "iter_000001" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the training subprocess never wrote its second checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lora.safetensors").exists()

    resumed_proc = _cli_train(config_file)  # the same command resumes from the newest complete checkpoint
    assert resumed_proc.wait() == 0, resumed_proc.stderr.read()
    resumed = lora_tensors(killed)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert [r["iteration"] for r in read_log(killed)] == [0, 1, 2, 3]


def _nan_reward(nan_calls):
    calls = {"n": 0}

    def factory():
        def reward(images, prompts):
            calls["n"] += 1
            r = images.mean(dim=(1, 2, 3))
            if calls["n"] in nan_calls:
                r[0] = float("nan")  # the first group of this iteration
            return r

        return reward

    return factory


def test_nan_reward_drops_the_group_and_goes_on(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "flaky", _nan_reward({2}))
    run = tmp_path / "nan_once"
    train(load_config("demo", None, tiny_overrides(model_dir, run, rewards=[{"name": "flaky"}])))
    rows = read_log(run)
    assert [r["groups_dropped_nan"] for r in rows] == [0, 1, 0]
    assert all(r["reward_mean"] is not None for r in rows)


def test_nan_three_iterations_running_stops_after_saving(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "broken", _nan_reward(set(range(1, 100))))
    run = tmp_path / "nan_always"
    cfg = load_config(
        "demo",
        None,
        tiny_overrides(model_dir, run, rewards=[{"name": "broken"}], **{"train.iterations": 6, "checkpoint.every": 5}),
    )
    with pytest.raises(TrainingError, match="NaN in 3 iterations in a row"):
        train(cfg)
    assert (run / "checkpoints" / "iter_000002" / "COMPLETE").is_file()
    assert len(read_log(run)) == 3


def test_resume_refuses_a_different_config(model_dir, tmp_path):
    run = tmp_path / "run"
    train(load_config("demo", None, tiny_overrides(model_dir, run, **{"train.iterations": 1})))
    with pytest.raises(Exception, match="another configuration"):
        train(load_config("demo", None, tiny_overrides(model_dir, run, **{"train.iterations": 1, "pec.beta": 0.9})))


def test_a_run_from_before_a_new_switch_resumes(model_dir, tmp_path):
    """An older trainer's checkpoint has another fingerprint (its schema lacked today's new switches), but its
    config.yaml, read with today's schema, is the same configuration: it resumes; another config is refused."""
    run = tmp_path / "run"
    overrides = tiny_overrides(model_dir, run, **{"train.iterations": 2})
    train(load_config("demo", None, overrides))
    first, last = complete_checkpoints(run)[0], complete_checkpoints(run)[-1]
    shutil.rmtree(last)
    state = torch.load(first / "state.pt", weights_only=False)
    state["fingerprint"] = "made-by-an-older-schema"
    torch.save(state, first / "state.pt")
    train(load_config("demo", None, overrides))  # resumes from iteration 1
    assert [r["iteration"] for r in read_log(run)] == [0, 1]
    shutil.rmtree(complete_checkpoints(run)[-1])
    with pytest.raises(Exception, match="another configuration"):
        train(load_config("demo", None, [*overrides, "pec.beta=0.9"]))


def test_perceptual_phase_is_skipped_only_where_nothing_needs_it(model_dir, tmp_path):
    for method, measured in (("none", False), ("pec", True)):
        run = tmp_path / method
        overrides = {"train.iterations": 1, "pec.method": method, "run.perceptual_stats": False}
        train(load_config("demo", None, tiny_overrides(model_dir, run, **overrides)))
        row = read_log(run)[0]
        assert all((key in row) == measured for key in ("vendi", "perceptual_entropy", "perceptual_energy")), method
        assert (run / "report.md").is_file() and (run / "lora.safetensors").is_file()


class _ZeroShareRank(Parallel):
    """A rank that trains no sample of any micro-batch while the others do (``loss_share`` 0), with no
    collectives; ``sharded`` set stands for FSDP, whose forwards and backwards every rank must join."""

    def loss_share(self, local_count):
        assert local_count == 0
        return 0.0

    def average_gradients(self, params):
        pass

    def clip_grad_norm(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class _RecordingOptimizer:
    """Records the LoRA gradients of every step (None where a parameter has none) and changes nothing."""

    def __init__(self, params):
        self.params, self.steps = params, []

    def step(self):
        self.steps.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_an_fsdp_rank_without_trained_samples_joins_every_forward_at_weight_zero(model_dir, tmp_path):
    backend = load_backend(model_dir)
    overrides = {"train.prompts_per_iteration": 1, "train.group_size": 4, "train.batch_size": 2, "train.kl_beta": 0.05}
    cfg = load_config("demo", None, tiny_overrides(model_dir, tmp_path / "run", **overrides))
    torch.manual_seed(cfg.train.seed)
    params = add_lora(backend, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    d = backend.defaults
    res, steps = d["resolution"], d["num_steps"]
    sigmas, guidance, noise_level = (
        backend.schedule(steps, res, res),
        float(d["guidance_scale"]),
        float(d["noise_level"]),
    )
    settings = RolloutSettings(cfg.sampling.sde, guidance, res, cfg.train.batch_size, "mean", sigmas, noise_level)
    window = Schedule(sigmas, stochastic_steps("steps", steps, size=2, start=0), noise_level)
    ro = rollout(backend, ["a red circle"] * 4, torch.tensor([11, 12, 13, 14]), window, settings)
    methods, upd = build_methods(cfg), update_settings(cfg, settings)
    assert len(ro.steps) == 2
    calls = {"n": 0}
    velocity = backend.velocity

    def counted(*args, **kwargs):
        calls["n"] += 1
        return velocity(*args, **kwargs)

    backend.velocity = counted

    def run(rewards, parallel):
        calls["n"] = 0
        optimizer = _RecordingOptimizer(params)
        adv = group_advantages(torch.tensor(rewards), cfg.train.group_size)
        out = update(backend, optimizer, params, ro, adv, methods, sigmas, noise_level, upd, parallel=parallel)
        return calls["n"], optimizer.steps, out

    # One process, every sample trained: 2 micro-batches × 2 steps × (policy + KL reference) forwards.
    trained_calls, trained_steps, trained_out = run([0.0, 1.0, 2.0, 3.0], SINGLE_PROCESS)
    assert trained_calls == 8 and len(trained_steps) == 2 and "policy_loss" in trained_out
    assert any(g is not None and g.abs().sum() > 0 for step in trained_steps for g in step)

    # Its group dropped (a NaN reward), this rank trains nothing; under FSDP it makes the same calls anyway.
    fsdp_calls, fsdp_steps, fsdp_out = run(
        [float("nan"), 1.0, 2.0, 3.0], _ZeroShareRank(rank=1, world=2, sharded=object())
    )
    assert fsdp_calls == trained_calls
    assert len(fsdp_steps) == 2
    for step in fsdp_steps:
        assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in step)
    assert set(fsdp_out) == {"grad_norm"} and fsdp_out["grad_norm"] == 0.0  # no statistics of untrained samples

    # Under DDP the rank only joins the gradient average: no forward at all.
    ddp_calls, ddp_steps, ddp_out = run([float("nan"), 1.0, 2.0, 3.0], _ZeroShareRank(rank=1, world=2))
    assert ddp_calls == 0 and len(ddp_steps) == 2
    assert all(g is None for step in ddp_steps for g in step) and set(ddp_out) == {"grad_norm"}
