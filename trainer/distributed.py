"""Data parallelism over processes (``accelerate launch``): which rank draws which sample, and gathering.

An iteration draws N = P·G samples (P prompts × group size G, group-contiguous global indices, one
seed each) from the iteration's generator — the same draws on every rank. A :class:`SampleLayout`
hands each of the W ranks N/W of those global indices:

* ``contiguous`` (possible when G divides N/W): rank r takes the block ``[r·N/W, (r+1)·N/W)``, whole groups;
* ``k_repeat`` (otherwise): sample i goes to rank ``i mod W``, so each group is spread over the ranks.

A sample keeps its global index and seed, so its noise and image are the same whatever rank draws
it. Per-sample rewards and perceptual statistics are gathered to every rank in global order
(:meth:`Parallel.gather`); groups are normalised there, as in one process (PEC's per-step z-score
and DRIFT's diversity need the whole group); then each rank updates on its own samples.

The LoRA is the only trained part, so its gradients are averaged over ranks with one all-reduce per
optimizer step — what DDP's reducer does — rather than by wrapping the transformer in DDP, whose
wrapper would hide the adapter switches the loop uses (LoRA off = the reference policy). FSDP, which
must own the forward to shard the frozen weights, is set up in :mod:`trainer.fsdp`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError


@dataclass(frozen=True)
class SampleLayout:
    """Which global sample indices each rank draws.

    Attributes:
        total: N, samples per iteration (all ranks together).
        world: W, number of processes.
        rank: this process.
        sampler: ``"contiguous"`` or ``"k_repeat"`` (see the module docstring).
    """

    total: int
    world: int
    rank: int
    sampler: str

    def indices(self, rank: int | None = None) -> torch.Tensor:
        """Global indices drawn by ``rank`` (default: this one), ``[N/W]`` int64, ascending."""
        rank = self.rank if rank is None else rank
        per_rank = self.total // self.world
        if self.sampler == "contiguous":
            return torch.arange(rank * per_rank, (rank + 1) * per_rank)
        return torch.arange(rank, self.total, self.world)

    def rank_major(self) -> torch.Tensor:
        """``[N]``: the global index of each row of a rank-by-rank concatenation of local tensors."""
        return torch.cat([self.indices(r) for r in range(self.world)])

    def mine(self, values):
        """This rank's entries of a per-sample list or tensor ``[N, ...]`` → ``[N/W, ...]`` (None stays None)."""
        if values is None:
            return None
        if isinstance(values, torch.Tensor):
            return values[self.indices()]
        return [values[i] for i in self.indices().tolist()]

    def local_advantages(self, adv) -> LocalAdvantages:
        """This rank's rows of the global :class:`~trainer.grpo.Advantages`."""
        mine = self.indices()
        return LocalAdvantages(adv.values[mine], adv.trained[mine])


@dataclass
class LocalAdvantages:
    """What the update reads of the advantages, for this rank's samples: ``values`` ``[n]``, ``trained`` ``[n]`` bool."""

    values: torch.Tensor
    trained: torch.Tensor


def plan_layout(
    total: int, group_size: int, batch_size: int, world: int, rank: int, sampler: str = "auto"
) -> SampleLayout:
    """The layout of N = ``total`` samples over ``world`` ranks; a :class:`ConfigError` states a broken rule.

    Rules: W divides N (every rank draws N/W samples); ``batch_size`` divides N/W (every local sample
    is in exactly one micro-batch); ``contiguous`` needs G | N/W, ``auto`` takes it whenever it can.
    """
    if total % world:
        raise ConfigError(
            f"train.prompts_per_iteration × train.group_size ({total}) must be a multiple of the number of "
            f"processes ({world}) so every rank draws the same number of samples"
        )
    per_rank = total // world
    if per_rank % batch_size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must divide the samples per rank, prompts_per_iteration × "
            f"group_size / processes = {total} / {world} = {per_rank}"
        )
    whole_groups = per_rank % group_size == 0
    if sampler == "contiguous" and not whole_groups:
        raise ConfigError(
            f"distributed.sampler=contiguous needs train.group_size ({group_size}) to divide the samples per rank "
            f"({per_rank}); use distributed.sampler=k_repeat (or auto), which spreads a group over the ranks"
        )
    if sampler == "auto":
        sampler = "contiguous" if whole_groups else "k_repeat"
    return SampleLayout(total, world, rank, sampler)


@dataclass
class Parallel:
    """This process's place among the ranks and the collectives the loop needs; one process by default.

    Attributes:
        rank, world: this process and the number of processes.
        device: the device of this rank's collectives (its GPU under NCCL, the CPU under gloo).
        sharded: the FSDP root module wrapping the transformer (:mod:`trainer.fsdp`), else None.
    """

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    sharded: Any = None

    @classmethod
    def from_environment(cls) -> Parallel:
        """Several processes when started by ``accelerate launch`` (``WORLD_SIZE`` > 1), else one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # Joins the process group: NCCL on GPUs, gloo on a machine without (or with ACCELERATE_USE_CPU=true).
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def model_device(self, requested: str) -> str:
        """``model.device``: ``auto`` is this rank's device when distributed, else cuda when available."""
        if requested != "auto":
            return requested
        if self.world > 1:
            return str(self.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def gather(self, local: torch.Tensor, layout: SampleLayout) -> torch.Tensor:
        """This rank's per-sample values ``[N/W, ...]`` → everyone's ``[N, ...]`` in global order (every rank)."""
        if self.world == 1:
            return local
        import torch.distributed as dist

        parts = [torch.empty_like(local, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous().to(self.device))
        ordered = torch.empty((layout.total, *local.shape[1:]), dtype=local.dtype, device=self.device)
        ordered[layout.rank_major().to(self.device)] = torch.cat(parts)
        return ordered.to(local.device)

    def gather_fields(self, stats, layout: SampleLayout):
        """A dataclass of per-sample tensors ``[N/W, ...]`` (e.g. ``PerceptualStats``) with each gathered to ``[N, ...]``."""
        if self.world == 1:
            return stats
        gathered = {
            f.name: self.gather(getattr(stats, f.name), layout)
            for f in dataclasses.fields(stats)
            if isinstance(getattr(stats, f.name), torch.Tensor)
        }
        return dataclasses.replace(stats, **gathered)

    def loss_share(self, local_count: int) -> float | None:
        """Weight of this rank's mean loss so the rank-averaged gradient is the mean over all ranks' samples.

        ``local_count`` samples of this micro-batch are trained here; the weight is ``local·W / global``
        (1 in one process). ``None`` when no rank trains a sample of this micro-batch (all skip it alike).
        """
        total = local_count
        if self.world > 1:
            import torch.distributed as dist

            count = torch.tensor([local_count], dtype=torch.int64, device=self.device)
            dist.all_reduce(count)
            total = int(count)
        return local_count * self.world / total if total else None

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the LoRA gradients over ranks (a rank without a gradient adds zeros); FSDP reduces its own."""
        if self.world == 1 or self.sharded is not None:
            return
        import torch.distributed as dist

        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        dist.all_reduce(flat)
        flat /= self.world
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).to(p.device)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over the whole LoRA (under FSDP the norm spans every rank's shard)."""
        if self.sharded is not None:
            return self.sharded.clip_grad_norm_(max_norm)  # frozen weights have no gradient: only the LoRA counts
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def gather_object(self, value: Any) -> list[Any]:
        """One picklable value per rank, in rank order (``[value]`` in one process)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


#: the default: one process, no collectives.
SINGLE_PROCESS = Parallel()
