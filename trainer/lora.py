"""The trained adapter on the backend's transformer: attach it (PEFT), switch it off, read and write it."""

from __future__ import annotations

import contextlib
import re

import torch

from comfy_pec import PECError

from .backends import Backend


def target_regex(targets: list[str]) -> str:
    """``lora.targets`` as one regular expression over full module paths (PEFT's ``target_modules`` string form,
    which it matches with ``re.fullmatch``).

    A plain target is a name suffix: ``to_out.0`` matches ``to_out.0`` and ``<anything>.to_out.0``. A target
    with ``*`` is a pattern over the whole path, each ``*`` one path component (a block index):
    ``single_transformer_blocks.*.attn.to_out`` matches FLUX.2's single-block output projection but not the
    double blocks' ``transformer_blocks.N.attn.to_out`` (a ModuleList, which PEFT cannot adapt) that the
    suffix ``attn.to_out`` would also name.
    """
    parts = []
    for target in targets:
        if "*" in target:
            parts.append(r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in target.split(".")))
        else:
            parts.append(r"(?:.*\.)?" + re.escape(target))
    return "(?:" + "|".join(parts) + ")"


def target_matches(name: str, target: str) -> bool:
    """Whether the module path ``name`` is one that ``target`` (a suffix or a ``*`` pattern) names."""
    return re.fullmatch(target_regex([target]), name) is not None


def add_lora(
    backend: Backend, rank: int, alpha: float, targets: list[str], init_scale: float = 0.0, seed: int = 0
) -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA of ``rank``/``alpha`` on the modules named by ``targets`` (:func:`target_regex`);
    its parameters.

    PEFT draws ``lora_A`` from the global generator (seed it first); ``init_scale > 0`` also draws
    ``lora_B ~ N(0, init_scale²)`` from a generator seeded with ``seed`` instead of PEFT's zeros.
    """
    from peft import LoraConfig

    backend.transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(targets), init_lora_weights=True)
    )
    params = [p for n, p in backend.transformer.named_parameters() if "lora_" in n]
    if not params:
        raise PECError(f"lora.targets {list(targets)} match no module of this model")
    if init_scale > 0:
        gen = torch.Generator().manual_seed(seed)
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=gen) * init_scale)
    for p in params:
        # float32 even on a bf16 network: bf16 keeps 8 mantissa bits, small AdamW updates would round away.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def lora_disabled(backend: Backend):
    """The reference policy: the same model with the LoRA switched off."""
    backend.transformer.disable_adapters()
    try:
        yield
    finally:
        backend.transformer.enable_adapters()


def lora_state(backend: Backend) -> dict[str, torch.Tensor]:
    """``{PEFT key: tensor}`` of the adapter, detached copies."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(backend.transformer).items()}


def set_lora_state(backend: Backend, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(backend.transformer, state)
