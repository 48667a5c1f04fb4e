"""Several processes: the sample layouts and their rules, FSDP's configuration, and two gloo ranks under
``accelerate launch`` giving the advantages (and the gradient scale) of one process."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer.checkpoint import complete_checkpoints
from trainer.config import ConfigError, load_config
from trainer.distributed import SINGLE_PROCESS, plan_layout
from trainer.runlog import read_log
from trainer.train import train

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- layouts


def test_whole_groups_per_rank_take_the_contiguous_sampler():
    layouts = [plan_layout(8, 2, 2, world=2, rank=r) for r in range(2)]
    assert layouts[0].sampler == "contiguous"
    assert layouts[0].indices().tolist() == [0, 1, 2, 3] and layouts[1].indices().tolist() == [4, 5, 6, 7]


def test_a_group_larger_than_a_rank_share_is_spread_round_robin():
    layouts = [plan_layout(4, 4, 1, world=2, rank=r) for r in range(2)]
    assert layouts[0].sampler == "k_repeat"
    assert layouts[0].indices().tolist() == [0, 2] and layouts[1].indices().tolist() == [1, 3]
    assert sorted(layouts[0].rank_major().tolist()) == [0, 1, 2, 3]
    assert layouts[1].mine(["a", "b", "c", "d"]) == ["b", "d"] and layouts[1].mine(None) is None


def test_one_process_layout_is_the_identity():
    layout = plan_layout(6, 3, 3, world=1, rank=0)
    values = torch.randn(6, 2)
    assert torch.equal(layout.mine(values), values)
    assert SINGLE_PROCESS.gather(values, layout) is values
    assert SINGLE_PROCESS.loss_share(3) == 1.0 and SINGLE_PROCESS.loss_share(0) is None


@pytest.mark.parametrize(
    "total, group, batch, world, sampler, rule",
    [
        (6, 3, 1, 4, "auto", "multiple of the number of processes"),
        (8, 2, 3, 2, "auto", "train.batch_size \\(3\\) must divide the samples per rank"),
        (4, 4, 1, 2, "contiguous", "use distributed.sampler=k_repeat"),
    ],
)
def test_broken_layout_rules_are_stated(total, group, batch, world, sampler, rule):
    with pytest.raises(ConfigError, match=rule):
        plan_layout(total, group, batch, world=world, rank=0, sampler=sampler)


# ----------------------------------------------------------------------------- FSDP configuration


def test_fsdp_and_model_gradient_checkpointing_are_exclusive():
    with pytest.raises(ConfigError, match="already recomputes the transformer blocks"):
        load_config("demo", None, ["distributed.fsdp.enabled=true", "model.gradient_checkpointing=true"])


def test_fsdp_in_one_process_fails_before_loading_the_model(tmp_path):
    config = load_config("demo", None, ["distributed.fsdp.enabled=true", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="start with accelerate launch"):
        train(config)


def test_a_model_without_block_classes_cannot_be_sharded():
    from comfy_pec import PECError
    from trainer.fsdp import block_classes

    with pytest.raises(PECError, match="names no transformer block class"):
        block_classes(torch.nn.Linear(2, 2))


class _FluxLike(torch.nn.Module):
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]  # as diffusers' FLUX declares


def test_fsdp_plugin_wraps_the_model_blocks_with_original_params():
    from trainer.fsdp import fsdp_plugin

    plugin = fsdp_plugin(_FluxLike(), torch.bfloat16, activation_checkpointing=True)
    assert plugin.transformer_cls_names_to_wrap == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert plugin.use_orig_params and plugin.activation_checkpointing
    assert plugin.reshard_after_forward.name == "FULL_SHARD"
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32


# ----------------------------------------------------------------------------- two gloo ranks

# A group-contiguous layout (each rank draws one whole group) and a split one (one group of 4 over 2 ranks).
CASES = {"contiguous": (2, 2), "split": (1, 4)}
DRIVER = """
import sys
from trainer.config import load_config
from trainer.train import train

for path in sys.argv[1:]:
    train(load_config(file=path))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config_file(tmp_path: Path, name: str, prompts: int, group: int, batch: int, extra: dict | None = None) -> Path:
    """One iteration of PEC on the embedded model, advantages logged; ``extra`` {section: {key: value}} adds to it."""
    settings = {
        "sampling": {"num_steps": 3, "window": {"rule": "all"}},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"iterations": 1, "prompts_per_iteration": prompts, "group_size": group, "batch_size": batch},
        "pec": {"method": "pec"},
        "report": {"grid_prompts": 1, "grid_seeds": [0]},
        "run": {"dir": str(tmp_path / name), "progress": False, "tensorboard": "off", "log_advantages": True},
    }
    for section, values in (extra or {}).items():
        settings.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _launch(tmp_path: Path, *files: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of an ``accelerate launch`` of DRIVER on two CPU processes training ``files`` in turn."""
    # accelerate's --cpu routes several processes to mpirun; its torchrun launcher (--multi_gpu) runs
    # them on a machine without GPUs too, and the trainer then joins a gloo group.
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(driver),
        *map(str, files),
    ], env


@pytest.mark.slow
def test_two_gloo_ranks_give_the_advantages_of_one_process(tmp_path):
    files = [_config_file(tmp_path, f"ddp_{case}", p, g, batch=2) for case, (p, g) in CASES.items()]
    cmd, env = _launch(tmp_path, *files)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    for case, (prompts, group) in CASES.items():
        # One process with a micro-batch as large as both ranks' together: the same gradient per step.
        train(load_config(file=str(_config_file(tmp_path, f"one_{case}", prompts, group, batch=4))))
        (multi,), (single,) = read_log(tmp_path / f"ddp_{case}"), read_log(tmp_path / f"one_{case}")
        assert (multi["processes"], single["processes"]) == (2, 1)
        # Equal up to float rounding: the ranks decode and score in smaller batches.
        torch.testing.assert_close(
            torch.tensor(multi["advantages"]), torch.tensor(single["advantages"]), atol=1e-4, rtol=0
        )
        assert multi["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3), json.dumps([multi, single])
        assert (tmp_path / f"ddp_{case}" / "lora.safetensors").is_file()
        assert (tmp_path / f"ddp_{case}" / "checkpoints" / "iter_000000" / "COMPLETE").is_file()


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora.safetensors"))


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL an ``accelerate launch`` started in a session of its own, and its ranks, as a lost node would be.

    torchrun starts every rank in a session of its own too: killing the launcher's process group alone
    would leave the ranks running to the end of the run.
    """
    import psutil  # a dependency of accelerate

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)  # the launcher restarts no rank meanwhile
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)  # the ranks and anything they started
    except psutil.NoSuchProcess:
        ranks = []
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while any(_running(rank) for rank in ranks) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_running(rank) for rank in ranks), "a rank outlived SIGKILL"


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE  # reparented, a killed rank may stay unreaped
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_two_gloo_ranks_killed_then_resumed_give_a_bitwise_identical_lora(tmp_path):
    # The split layout (one group of 4 over both ranks), a checkpoint after every iteration.
    prompts, group = CASES["split"]
    extra = {"train": {"iterations": 3}, "checkpoint": {"every": 1, "keep": 3}}
    whole = _config_file(tmp_path, "whole", prompts, group, batch=2, extra=extra)
    cmd, env = _launch(tmp_path, whole)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _lora(tmp_path / "whole")

    killed = tmp_path / "killed"
    config_file = _config_file(tmp_path, "killed", prompts, group, batch=2, extra=extra)
    cmd, env = _launch(tmp_path, config_file)
    # A session of its own, so one kill takes the launcher and both ranks at once, as a lost node would.
    with open(tmp_path / "killed.stderr", "w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    marker = killed / "checkpoints" / "iter_000000" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_launch(proc)
    assert marker.exists(), (
        "the ranks never wrote their first checkpoint: " + (tmp_path / "killed.stderr").read_text()[-3000:]
    )
    # The kill lands a poll after that marker, but on a busy machine the poll can lag by seconds, and an
    # iteration here takes about one: the run may have checkpointed further, or even exported.
    assert [r["iteration"] for r in read_log(killed)][:1] == [0]
    _resume_from_first_checkpoint(tmp_path, config_file, killed, reference, iterations=3)
    assert [r["processes"] for r in read_log(killed)] == [2, 2, 2]


def _resume_from_first_checkpoint(
    tmp_path: Path, config_file: Path, run: Path, reference: dict, iterations: int
) -> None:
    """Go back to what a kill right after the first checkpoint leaves, relaunch the same command (on a fresh
    port), and check that it replays iterations 1.. to a LoRA bitwise equal to ``reference``."""
    for folder in complete_checkpoints(run)[1:]:
        shutil.rmtree(folder)
    (run / "lora.safetensors").unlink(missing_ok=True)
    cmd, env = _launch(tmp_path, config_file)
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from iter_000000 (iteration 1 of {iterations})" in resumed.stdout, resumed.stdout[-3000:]
    lora = _lora(run)
    assert lora.keys() == reference.keys()
    assert all(torch.equal(lora[k], reference[k]) for k in reference), "the resumed LoRA differs from the whole run's"
    assert [r["iteration"] for r in read_log(run)] == list(range(iterations))


@pytest.mark.slow
def test_two_gloo_ranks_under_fsdp_give_the_advantages_of_one_process_and_resume_bitwise(tmp_path):
    # The FSDP path on CPU: the trainer shards by hand with accelerate's plugin (accelerate shards only on GPUs).
    prompts, group = CASES["split"]
    extra = {"train": {"iterations": 2}, "checkpoint": {"every": 1, "keep": 3}}
    fsdp = _config_file(
        tmp_path, "fsdp", prompts, group, batch=2, extra={**extra, "distributed": {"fsdp": {"enabled": True}}}
    )
    cmd, env = _launch(tmp_path, fsdp)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "fsdp"
    assert [folder.name for folder in complete_checkpoints(run)] == ["iter_000000", "iter_000001"]
    reference = _lora(run)

    train(load_config(file=str(_config_file(tmp_path, "one", prompts, group, batch=4, extra=extra))))
    for multi, single in zip(read_log(run), read_log(tmp_path / "one"), strict=True):
        assert (multi["processes"], single["processes"]) == (2, 1)
        torch.testing.assert_close(
            torch.tensor(multi["advantages"]), torch.tensor(single["advantages"]), atol=1e-4, rtol=0
        )
        assert multi["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3), json.dumps([multi, single])
    single_lora = _lora(tmp_path / "one")  # the gathered LoRA keeps the keys and shapes of one process's
    assert {k: v.shape for k, v in reference.items()} == {k: v.shape for k, v in single_lora.items()}

    assert (run / "lora.safetensors").is_file()
    _resume_from_first_checkpoint(tmp_path, fsdp, run, reference, iterations=2)
