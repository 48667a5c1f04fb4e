"""Shared test set-up: offline, CPU-only, deterministic, and small thread counts for 2-core CI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tiny models' ops are too small for OpenMP threads to pay (see trainer.cli).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_comfy = pytest.mark.skip(reason="needs COMFYUI_PATH pointing at a ComfyUI checkout")
    has_comfy = bool(os.environ.get("COMFYUI_PATH"))
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "comfyui" in item.keywords and not has_comfy:
            item.add_marker(skip_comfy)
