"""FSDP for FLUX-sized models under ``accelerate launch`` (``distributed.fsdp.enabled``).

The transformer is fully sharded over the ranks with one FSDP unit per transformer block (the
model's own block classes, its ``_no_split_modules``), keeping the original parameters
(``use_orig_params``: a unit mixes the trainable LoRA with frozen weights) and optionally
recomputing each block in the backward pass. FSDP flattens a unit's parameters into one tensor of
one dtype, so the shards are stored in float32 — the LoRA's precision — and gathered in the model's
dtype for the forward (mixed precision, gradients reduced in float32).

Only the LoRA trains, so checkpoints and exports hold the LoRA and its optimizer state gathered to
full tensors (small); the frozen base weights are never written, and there is nothing else to shard.
"""

from __future__ import annotations

import torch

from comfy_pec import PECError


def block_classes(transformer: torch.nn.Module) -> list[str]:
    """Class names of the transformer's blocks, one FSDP unit each (diffusers' ``_no_split_modules``)."""
    names = list(getattr(transformer, "_no_split_modules", None) or [])
    if not names:
        raise PECError(f"{type(transformer).__name__} names no transformer block class (_no_split_modules) for FSDP")
    return names


def fsdp_plugin(transformer: torch.nn.Module, compute_dtype: torch.dtype, activation_checkpointing: bool):
    """The ``accelerate`` FSDP plugin: full shard, block auto-wrap, original params, bf16 compute."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecision

    return FullyShardedDataParallelPlugin(
        fsdp_version=1,
        reshard_after_forward="FULL_SHARD",  # FSDP1's sharding strategy: parameters, gradients, optimizer state
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=block_classes(transformer),
        use_orig_params=True,
        activation_checkpointing=activation_checkpointing,
        mixed_precision_policy=MixedPrecision(
            param_dtype=compute_dtype, reduce_dtype=torch.float32, buffer_dtype=compute_dtype
        ),
        state_dict_type="FULL_STATE_DICT",
        sync_module_states=False,  # every rank loaded the same weights and the same seeded LoRA
    )


def shard_transformer(backend, activation_checkpointing: bool) -> torch.nn.Module:
    """Wrap ``backend.transformer`` (LoRA attached) in FSDP and run the backend's forwards through it.

    Returns the FSDP root; build the optimizer on its LoRA parameters (:func:`lora_parameters`).
    """
    from accelerate import Accelerator
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = fsdp_plugin(backend.transformer, backend.dtype, activation_checkpointing)
    backend.transformer.float()  # one dtype per flattened unit; compute stays in backend.dtype
    root = Accelerator(fsdp_plugin=plugin).prepare_model(backend.transformer)
    if not isinstance(root, FSDP):  # accelerate shards only across GPU processes
        raise PECError("distributed.fsdp.enabled needs several CUDA processes: start pec train with accelerate launch")
    backend.set_network(root)
    return root


def lora_parameters(root: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in root.named_parameters() if "lora_" in name]


def full_lora_state(root: torch.nn.Module, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA as full CPU tensors ``{PEFT key: tensor}`` on rank 0 (empty elsewhere); every rank must call it.

    The gather goes unit by unit to rank 0's CPU memory, which holds the whole model for a moment.
    """
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        full = root.state_dict()
    if not full:
        return {}
    return {k: v.clone() for k, v in get_peft_model_state_dict(transformer, state_dict=full).items()}


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full (unsharded) tensors, keyed by parameter name; every rank must call it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.optim_state_dict(root, optimizer)


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state` back into this rank's shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(root, optimizer, state))
