"""What every model-based reward shares: device choice, prompt checks, batching, float32 scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from comfy_pec import PECError
from comfy_pec.encoders import to_nchw


def resolve_device(device=None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class ModelReward:
    """A frozen reward model: ``reward(images, prompts) -> [B]`` float32 on the CPU, no gradient.

    Subclasses implement :meth:`score_batch` on at most ``batch_size`` images (any layout
    :func:`comfy_pec.encoders.to_nchw` takes, values in [0, 1]) or override :meth:`score`.
    """

    def __init__(self, device=None, batch_size: int = 16):
        self.device, self.batch_size = resolve_device(device), int(batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = to_nchw(images).shape[0]
        if len(prompts) != n:
            raise PECError(f"{type(self).__name__}: {n} images but {len(prompts)} prompts")
        return self.score(images, prompts).float().cpu()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.batched(self.score_batch, images, prompts)

    def batched(self, fn, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``fn(images, prompts)`` on ``batch_size`` pairs at a time, concatenated."""
        x, step = to_nchw(images), self.batch_size
        return torch.cat([fn(x[i : i + step], prompts[i : i + step]) for i in range(0, len(x), step)])

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def linear_stack(dim: int, widths: Sequence[int], dropouts: Sequence[float | None]) -> torch.nn.Sequential:
    """``Linear(dim, widths[0]) [Dropout] Linear(widths[0], widths[1]) ...`` with no activation — the
    head of Aesthetic v2.5 and of ImageReward; ``dropouts[i]`` (or None) follows linear i, so the
    Sequential indices match their published state dicts."""
    layers, width = [], dim
    for out, p in zip(widths, dropouts):
        layers.append(torch.nn.Linear(width, out))
        if p is not None:
            layers.append(torch.nn.Dropout(p))
        width = out
    return torch.nn.Sequential(*layers)


def load_torch_file(path, what: str):
    """``torch.load`` of a published checkpoint, tensors only (``weights_only``: no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / unpickling-policy errors: one readable message
        raise PECError(f"{what}: cannot read {path} as a torch checkpoint ({str(err).splitlines()[0]})") from None


def load_tokenizer(path: str | None, fallback: str, what: str, cls: str = "AutoTokenizer"):
    """A transformers tokenizer (class ``cls``) from the model's own directory / hub repo when it
    ships one, else from ``fallback`` (the hub repo the model's authors tokenise with)."""
    import transformers

    for source in (path, fallback):
        if source is not None:
            try:
                return getattr(transformers, cls).from_pretrained(str(source))
            except (OSError, ValueError, TypeError):
                pass
    raise PECError(f"{what}: no tokenizer in {path} and none loadable from {fallback} (offline?)")
