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

import re

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
    if _gloo_on_cpu():
        # accelerate leaves CPU processes unsharded: the same plugin applied by hand lets the path run in CI.
        root = _shard_by_hand(backend.transformer, plugin)
    else:
        root = Accelerator(fsdp_plugin=plugin).prepare_model(backend.transformer)
    if not isinstance(root, FSDP):  # accelerate shards only across GPU processes
        raise PECError("distributed.fsdp.enabled needs several CUDA processes: start pec train with accelerate launch")
    backend.set_network(root)
    return root


def _gloo_on_cpu() -> bool:
    """Several processes joined in a process group without CUDA (gloo ranks, as in CI)."""
    import torch.distributed as dist

    return not torch.cuda.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shard_by_hand(transformer: torch.nn.Module, plugin) -> torch.nn.Module:
    """What ``Accelerator.prepare_model`` does with ``plugin`` on a GPU, on this rank's CPU."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(transformer)  # the block class names → transformer_auto_wrap_policy
    root = FSDP(
        transformer,
        sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        use_orig_params=plugin.use_orig_params,
        sync_module_states=plugin.sync_module_states,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=torch.device("cpu"),
    )
    if plugin.activation_checkpointing:
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(root, checkpoint_wrapper_fn=wrapper, auto_wrap_policy=plugin.auto_wrap_policy)
    return root


def lora_parameters(root: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in root.named_parameters() if "lora_" in name]


def full_lora_state(root: torch.nn.Module, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA as full CPU tensors ``{PEFT key: tensor}`` on rank 0 (empty elsewhere); every rank must call it.

    The gather goes unit by unit to rank 0's CPU memory, which holds the whole model for a moment.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    ):
        full = root.state_dict()
    if not full:
        return {}
    # Not peft's get_peft_model_state_dict: it selects the LoRA by the transformer's module names, which now
    # hold FSDP's and the checkpoint wrapper's prefixes, and finds nothing in the gathered (clean) keys.
    # Its format: "<module>.lora_A.<adapter>.weight" -> "<module>.lora_A.weight", add_lora's one adapter.
    (adapter,) = transformer.peft_config
    infix = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(adapter)}\.")
    return {infix.sub(r".\1.", k): v.clone() for k, v in full.items() if infix.search(k)}


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full (unsharded) tensors, keyed by parameter name; every rank must call it."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if root.compute_device.type != "cpu":
        return FSDP.optim_state_dict(root, optimizer)
    # Gathering to the CPU on CPU ranks is a no-op ``.cpu()``: every state stays a view of one gather buffer
    # that FSDP reuses for the next state (exp_avg would hold exp_avg_sq's values). There, clone instead.
    with FSDP.state_dict_type(
        root, StateDictType.FULL_STATE_DICT, optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False)
    ):
        return FSDP.optim_state_dict(root, optimizer)


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state` back into this rank's shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(root, optimizer, state))
