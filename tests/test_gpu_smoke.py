"""benchmarks/gpu_smoke.py: a clear message without CUDA, and the whole script at tiny sizes on the CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def gpu_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_says_so(gpu_smoke, capsys):
    assert gpu_smoke.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_runs_two_iterations_of_both_models(gpu_smoke, capsys):
    assert gpu_smoke.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    for name in ("sd3.5-medium", "flux.1-dev"):
        assert f"== {name}" in out
    assert out.count("iteration 1: rollout") == 2 and "update" in out
