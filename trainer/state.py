"""The state of a training run — LoRA parameters, optimizer, EMA, the methods' states, RNG, iteration —
in one object that owns resume, checkpoint and export (docs/design.md §9).

A checkpoint holds everything an uninterrupted run would still have in memory, so a run killed at any
point and resumed from its newest complete checkpoint ends with the same LoRA, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from comfy_pec import PECError, __version__
from comfy_pec.lora_format import save_lora

from .backends import Backend
from .checkpoint import latest_checkpoint, load_state, save_checkpoint
from .config import ConfigError, load_config
from .distributed import Parallel
from .fsdp import full_lora_state, full_optimizer_state, load_optimizer_state, lora_parameters, shard_transformer
from .lora import add_lora, lora_state, set_lora_state
from .methods import Method, build_methods
from .rollout import RolloutSettings


def lora_metadata(config, settings: RolloutSettings) -> dict[str, Any]:
    """What a run's LoRA files say about it: title, base model, resolution and the ``pec.*`` provenance
    (``global_step`` is filled in at export)."""
    provenance = {
        "method": config.pec.method if config.pec.method != "none" else "flow-grpo",
        "beta": config.pec.beta,
        "encoder": config.pec.encoder,
        "rewards": {r.name: r.weight for r in config.rewards},
        "noise_level": settings.noise_level,
        "group_size": config.train.group_size,
        "global_step": None,
        "config_hash": config.fingerprint(),
        "base_model_revision": config.model.revision or "",
    }
    return {
        "title": f"PEC {config.pec.method} LoRA",
        "base_model": config.model.path or "pec-embedded-toy",
        "resolution": settings.resolution,
        "provenance": provenance,
    }


@dataclass
class RunState:
    """A run in memory. ``start`` is the first iteration still to run (> 0 after a resume)."""

    backend: Backend
    parallel: Parallel
    run_dir: Path
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor] | None
    methods: list[Method]
    fingerprint: str
    metadata: dict[str, Any]  # lora_metadata(config)
    lora_alpha: float
    keep: int  # checkpoints kept on disk
    start: int = 0

    @classmethod
    def begin(cls, backend: Backend, config, parallel: Parallel, resume: bool, metadata: dict[str, Any]) -> RunState:
        """Attach the LoRA, build the optimizer, EMA and methods, and resume from the newest complete
        checkpoint of ``config.run.dir`` when ``resume`` (another configuration's run is refused)."""
        t, lora, run_dir = config.train, config.lora, Path(config.run.dir)
        torch.manual_seed(t.seed)  # PEFT draws lora_A's init from the global generator
        params = add_lora(backend, lora.rank, lora.alpha, lora.targets, lora.init_scale, t.seed)
        found = latest_checkpoint(run_dir) if resume else None
        saved = load_state(found) if found is not None else None
        if saved is not None:
            if saved["fingerprint"] != config.fingerprint() and not same_configuration(run_dir, config):
                raise PECError(
                    f"{run_dir} holds a run with another configuration (hash {saved['fingerprint']} vs "
                    f"{config.fingerprint()}); use a new run.dir or the same config"
                )
            set_lora_state(backend, saved["lora"])  # before FSDP, which then shards the loaded weights
        if config.distributed.fsdp.enabled:
            parallel.sharded = shard_transformer(backend, config.distributed.fsdp.activation_checkpointing)
            params = lora_parameters(parallel.sharded)
        if config.model.compile:
            backend.set_network(torch.compile(backend.network))
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        run = cls(
            backend=backend,
            parallel=parallel,
            run_dir=run_dir,
            params=params,
            optimizer=optimizer,
            ema=None,
            methods=build_methods(config),
            fingerprint=config.fingerprint(),
            metadata=metadata,
            lora_alpha=lora.alpha,
            keep=config.checkpoint.keep,
        )
        run.ema = run.current_lora() if t.ema.enabled else None
        if saved is not None:
            run._restore(saved, found, t.iterations)
        return run

    def _restore(self, saved: dict[str, Any], folder: Path, iterations: int) -> None:
        if self.parallel.sharded is None:
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            load_optimizer_state(self.parallel.sharded, self.optimizer, saved["optimizer"])
        self.ema = saved["ema"]
        for method in self.methods:
            method.load_state_dict(saved["methods"].get(method.name, {}))
        # Ranks draw nothing from the global generator after the seeded LoRA init: rank 0's state is everyone's.
        torch.set_rng_state(saved["torch_rng"])
        self.start = saved["iteration"] + 1
        if self.parallel.is_main:
            print(f"resuming {self.run_dir} from {folder.name} (iteration {self.start} of {iterations})")

    def current_lora(self) -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} on the CPU (under FSDP gathered on rank 0, empty elsewhere; all ranks call it)."""
        sharded = self.parallel.sharded
        return lora_state(self.backend) if sharded is None else full_lora_state(sharded, self.backend.transformer)

    def ema_update(self, decay: float) -> None:
        """``ema ← decay·ema + (1 - decay)·θ`` after an optimizer step (no-op without EMA)."""
        if self.ema is None:
            return
        for key, value in self.current_lora().items():
            self.ema[key].mul_(decay).add_(value.cpu(), alpha=1.0 - decay)

    def export(self, path: Path, iteration: int, lora=None) -> None:
        """Write the LoRA file (the EMA weights when on); ``lora``: the gathered LoRA under FSDP."""
        source: Any = self.ema if self.ema is not None else (self.backend.transformer if lora is None else lora)
        meta = self.metadata
        save_lora(
            source,
            path,
            alpha=None if source is self.backend.transformer else self.lora_alpha,
            dtype=torch.float32,
            architecture=self.backend.architecture,
            base_model=meta["base_model"],
            title=meta["title"],
            resolution=meta["resolution"],
            provenance={**meta["provenance"], "global_step": iteration + 1},
        )

    def checkpoint(self, iteration: int) -> Path | None:
        """Every rank calls it (FSDP gathers); rank 0 writes the folder and returns it."""
        lora, sharded = self.current_lora(), self.parallel.sharded
        state = {
            "iteration": iteration,
            "fingerprint": self.fingerprint,
            "lora": lora,
            "optimizer": self.optimizer.state_dict()
            if sharded is None
            else full_optimizer_state(sharded, self.optimizer),
            "ema": self.ema,
            "methods": {m.name: m.state_dict() for m in self.methods},
            "torch_rng": torch.get_rng_state(),
            "version": __version__,
        }
        if not self.parallel.is_main:
            return None
        exported = None if sharded is None else lora
        return save_checkpoint(
            self.run_dir,
            iteration,
            state,
            lambda p: self.export(p, iteration, lora=exported),
            self.keep,
        )


def same_configuration(run_dir: Path, config) -> bool:
    """Whether the run's saved ``config.yaml``, read with today's schema, is ``config``: a run made before a
    switch was added (at its default, which keeps the old behaviour) has another fingerprint in its
    checkpoints but the same settings, and resumes."""
    saved = run_dir / "config.yaml"
    try:
        return saved.is_file() and load_config(None, str(saved)).fingerprint() == config.fingerprint()
    except ConfigError:  # a key today's schema no longer has: not the same configuration
        return False
