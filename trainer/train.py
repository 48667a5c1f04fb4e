"""GRPO fine-tuning with perceptual-entropy shaping — the training loop, top to bottom (docs/design.md §9).

One iteration:
  1. draw     — prompts, seeds and the schedule (which steps are SDE and trained), from (seed, iteration);
  2. rollout  — P prompts × G samples with the current policy, storing x, x', μ_old, log p_old per trained step;
  3. reward   — score the final images (weighted reward terms);
  4. perceive — decode x' and μ_old, embed them: residual energy e, perceptual entropy h_A, e_VAE;
  5. shape    — the methods shape the reward (PEC, PCVAE, DRIFT) and pick each group's normalising subset;
                group advantages;
  6. update   — recompute log p_θ of every stored step, clipped surrogate plus the methods' loss terms;
  7. log, checkpoint (atomic); at the end export the LoRA and write the report.

The methods (:mod:`trainer.methods`) plug into steps 1, 5 and 6 through their hooks; the run's state
(:class:`~trainer.state.RunState`) owns resume, checkpoints and export. Every random draw of iteration k
comes from generators seeded by (train.seed, k), so a resumed run replays what an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from comfy_pec import PECError
from comfy_pec.sde import step_entropy

from .backends import Backend, load_backend
from .config import Config, ConfigError, save_config
from .distributed import Parallel, SampleLayout, plan_layout
from .grpo import Advantages, group_advantages
from .lora import lora_disabled
from .methods import Method, RunContext, ShapeInputs
from .methods.drift import PromptNoise
from .metrics import group_vendi
from .perceptual import PerceptualStats, embed_latents
from .probe import Probe, make_probe, run_probe
from .prompts import resolve_prompts
from .rewards import WeightedReward, build_reward
from .rollout import Rollout, RolloutSettings, Schedule, group_initial_seeds, iteration_rng, perceive, rollout
from .runlog import RunLog
from .state import RunState, lora_metadata
from .update import UpdateSettings, update


class TrainingError(PECError):
    """The run cannot go on (e.g. rewards NaN too many iterations in a row); a checkpoint was saved."""


def train(
    config: Config,
    resume: bool = True,
    progress: bool | None = None,
    backend: Backend | None = None,
    bar_position: int = 0,
) -> Path:
    """Run (or resume) GRPO training; returns the run directory.

    ``resume=True`` continues from the newest complete checkpoint in ``config.run.dir`` when there is
    one (a run directory with a different configuration fingerprint is refused). ``backend``: an
    already built model (e.g. randomly initialised in memory) instead of loading ``config.model``.
    ``bar_position``: the progress bar's line, for runs trained side by side.

    Started by ``accelerate launch`` on several processes, each rank draws its share of every
    iteration's samples (:mod:`trainer.distributed`); rank 0 writes the log, checkpoints and exports.
    """
    setup, run = set_up(config, backend, resume, progress)
    t, group, parallel, methods = config.train, config.train.group_size, setup.parallel, run.methods
    log = _open_log(config, setup.run_dir, run.start) if parallel.is_main else None
    nan_streak = 0  # iterations in a row with a NaN reward (restarts at 0 on resume)
    iterations = range(run.start, t.iterations)
    desc = f"train {setup.run_dir.name}"
    bar = tqdm(iterations, desc, t.iterations, disable=not setup.progress, initial=run.start, position=bar_position)
    for it in bar:
        _probe(setup, run, it, t.iterations, log)
        for method in methods:
            method.begin_iteration(it)
        clock = PhaseClock()
        every = draw_iteration(it, t.seed, setup.prompts, t.prompts_per_iteration, group, methods)
        draw = every.mine(setup.layout)
        ro = rollout(run.backend, draw.prompts, draw.seeds, draw.schedule, setup.settings, draw.init_seeds, draw.noise)
        clock.lap("rollout")
        rewards, parts = setup.reward_fn(ro.images, ro.prompts)
        rewards = parallel.gather(rewards, setup.layout)
        parts = {k: parallel.gather(v, setup.layout) for k, v in parts.items()}
        clock.lap("reward")
        local_stats, stats, features = perceive_iteration(setup, run.backend, ro, draw)
        clock.lap("perceptual")

        shaped, keep = shape_rewards(
            methods, ShapeInputs(rewards, stats, features, ro.steps, group, draw.prompt_ids, every.start_seeds)
        )
        adv = group_advantages(shaped, group, t.adv_std, t.adv_clip, keep=keep)
        nan_streak = nan_streak + 1 if bool(adv.dropped.any()) else 0
        upd = {}
        if bool(adv.trained.any()):
            local, sched = setup.layout.local_advantages(adv), draw.schedule
            upd = update(
                run.backend,
                run.optimizer,
                run.params,
                ro,
                local,
                methods,
                sched.sigmas,
                sched.noise_level,
                setup.update,
                local_stats,
                parallel,
            )
            run.ema_update(t.ema.decay)
        clock.lap("update")

        row = log_row(it, rewards, parts, shaped, ro, stats, features, adv, methods, group)
        if config.run.log_advantages:
            row["advantages"] = adv.values.tolist()
        row.update(prompt_ids=draw.prompt_ids, processes=parallel.world, **upd, **clock.times, time_total=clock.total)
        if log is not None:
            log.write(row)
        bar.set_postfix(
            reward=f"{row['reward_mean']:.3f}", **({"vendi": f"{row['vendi']:.2f}"} if "vendi" in row else {})
        )

        if nan_streak >= t.nan_patience:
            folder = run.checkpoint(it)
            if log is not None:
                log.close()
            raise TrainingError(
                f"rewards were NaN in {nan_streak} iterations in a row (last: {it}); stopped after saving "
                f"{folder}. Check the reward models and the prompts."
            )
        if (it + 1) % config.checkpoint.every == 0 or it == t.iterations - 1:
            run.checkpoint(it)
    _probe(setup, run, t.iterations, t.iterations, log)
    finish(setup, run, config, log)
    return setup.run_dir


# --------------------------------------------------------------------------------------------------
# The loop's pieces
# --------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the loop reads and never changes: where the run lives, what it samples, scores and measures."""

    parallel: Parallel
    layout: SampleLayout  # this rank's share of every iteration's samples
    run_dir: Path
    progress: bool
    prompts: list[str]
    reward_fn: WeightedReward
    encoder: Callable[[torch.Tensor], torch.Tensor]
    settings: RolloutSettings
    update: UpdateSettings
    measure: bool  # perceive every iteration (a method needs it, or run.perceptual_stats)
    features: bool  # embed the final images (whenever measuring, or a method needs the features alone)
    decode: str  # pec.decode
    energy_draw: str  # pec.energy_draw
    chunk_size: int  # pec.chunk_size
    probe: Probe


def set_up(config: Config, backend: Backend | None, resume: bool, progress: bool | None) -> tuple[Setup, RunState]:
    """Check what needs no model, load the model and encoder, attach the LoRA, resume, set the methods up."""
    from comfy_pec.encoders import load_encoder

    t, pec = config.train, config.pec
    parallel = Parallel.from_environment()
    total = t.prompts_per_iteration * t.group_size
    layout = plan_layout(total, t.group_size, t.batch_size, parallel.world, parallel.rank, config.distributed.sampler)
    if config.distributed.fsdp.enabled and parallel.world == 1:
        raise ConfigError("distributed.fsdp.enabled shards the model over processes: start with accelerate launch")
    prompts, reward_fn = resolve_prompts(config.prompts.train), build_reward(config.rewards)  # before any model
    eval_prompts = resolve_prompts(config.prompts.eval) if config.probe.every else []
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    backend = backend or load_model(config, parallel)
    encoder = load_encoder(pec.encoder, normalize=pec.normalize_features, device=backend.device, path=pec.encoder_path)
    settings = rollout_settings(config, backend)
    run = RunState.begin(backend, config, parallel, resume, lora_metadata(config, settings))
    measure = config.run.perceptual_stats or any(m.uses_perceptual for m in run.methods)
    context = RunContext(backend, encoder, prompts, settings, t.seed, t.prompts_per_iteration, t.group_size)
    for method in run.methods:
        method.setup(context)
    setup = Setup(
        parallel=parallel,
        layout=layout,
        run_dir=run_dir,
        progress=(config.run.progress if progress is None else progress) and parallel.is_main,
        prompts=prompts,
        reward_fn=reward_fn,
        encoder=encoder,
        settings=settings,
        update=update_settings(config, settings),
        measure=measure,
        features=measure or any(m.uses_features for m in run.methods),
        decode=pec.decode,
        energy_draw=pec.energy_draw,
        chunk_size=pec.chunk_size,
        probe=make_probe(config, eval_prompts, settings.num_steps),
    )
    return setup, run


def load_model(config: Config, parallel: Parallel) -> Backend:
    """The backend of ``config.model`` on this rank's device."""
    m = config.model
    return load_backend(
        m.path,
        family=m.family,
        base=m.base,
        revision=m.revision,
        dtype=getattr(torch, m.dtype),
        device=parallel.model_device(m.device),
        use_t5=m.use_t5,
        max_sequence_length=m.max_sequence_length,
        prompt_cache=m.prompt_cache,
        offload_text_encoders=m.offload_text_encoders,
        gradient_checkpointing=m.gradient_checkpointing,
    )


def rollout_settings(config: Config, backend: Backend) -> RolloutSettings:
    """``config.sampling`` with the model's defaults (its ``pec.json``) filled in, and the run's schedule."""
    s, defaults = config.sampling, backend.defaults
    resolution = int(s.resolution or defaults["resolution"])
    num_steps = int(s.num_steps or defaults["num_steps"])
    return RolloutSettings(
        sde=s.sde,
        guidance=float(defaults["guidance_scale"] if s.guidance_scale is None else s.guidance_scale),
        resolution=resolution,
        batch_size=config.train.batch_size,
        log_prob_reduction=config.train.log_prob_reduction,
        sigmas=backend.schedule(num_steps, resolution, resolution),
        noise_level=float(s.noise_level or defaults["noise_level"]),
    )


def update_settings(config: Config, settings: RolloutSettings) -> UpdateSettings:
    t = config.train
    return UpdateSettings(
        sde=settings.sde,
        guidance=settings.guidance,
        batch_size=t.batch_size,
        inner_epochs=t.inner_epochs,
        clip_low=t.clip_range,
        clip_high=t.clip_range_high or t.clip_range,
        grad_clip=t.grad_clip,
        log_prob_reduction=t.log_prob_reduction,
    )


@dataclass
class IterationDraw:
    """Every random choice of one iteration: N = P·G samples (group-contiguous)."""

    prompts: list[str]  # [N]
    seeds: torch.Tensor  # [N], each sample's noise
    schedule: Schedule
    noise: PromptNoise | None  # DRIFT's prompt-embedding noise
    prompt_ids: list[int]  # [P] indices of the drawn prompts in the training set
    group_seeds: torch.Tensor  # [N], the seed of each sample's group (its first sample's)

    @property
    def init_seeds(self) -> torch.Tensor | None:
        """``[N]`` seeds of the initial noise when a group shares it (the group's seed), else ``None``."""
        return self.group_seeds if self.schedule.shared_init else None

    @property
    def start_seeds(self) -> torch.Tensor:
        """``[N]`` the seed of each sample's initial noise: its group's when the group shares it, else its own."""
        return self.group_seeds if self.schedule.shared_init else self.seeds

    def mine(self, layout: SampleLayout) -> IterationDraw:
        """This rank's samples (all of them in one process)."""
        noise = None if self.noise is None else dataclasses.replace(self.noise, seeds=layout.mine(self.noise.seeds))
        mine = layout.mine
        return IterationDraw(
            mine(self.prompts),
            mine(self.seeds),
            self.schedule,
            noise,
            self.prompt_ids,
            mine(self.group_seeds),
        )


def draw_iteration(
    iteration: int, seed: int, prompts: list[str], prompts_per_iteration: int, group_size: int, methods: list[Method]
) -> IterationDraw:
    """Every random choice of ``iteration``, in a fixed order from one generator seeded by (seed, iteration):
    the prompts (each repeated ``group_size`` times), a seed per sample, the schedule (the first method that
    gives one), each group's seed (its initial noise's, when the group shares it), and the prompt-embedding
    noise (``None`` when no method perturbs)."""
    gen = iteration_rng(seed, iteration)
    chosen = torch.randint(len(prompts), (prompts_per_iteration,), generator=gen).tolist()
    batch_prompts = [prompts[c] for c in chosen for _ in range(group_size)]
    seeds = torch.randint(2**62, (len(batch_prompts),), generator=gen)
    schedule = next(s for m in methods if (s := m.schedule(iteration, gen)) is not None)
    group_seeds = group_initial_seeds(seeds, group_size, shared=True)
    noise = next((n for m in methods if (n := m.prompt_noise(iteration, gen, len(batch_prompts))) is not None), None)
    return IterationDraw(batch_prompts, seeds, schedule, noise, chosen, group_seeds)


def perceive_iteration(
    setup: Setup, backend: Backend, ro: Rollout, draw: IterationDraw
) -> tuple[PerceptualStats | None, PerceptualStats | None, torch.Tensor | None]:
    """This rank's perceptual stats of the trained steps, every rank's (whole groups: PEC's z-score), and the
    perceptual features of every rank's final images ``[N, d_f]``; ``None`` for what nothing needs."""
    parallel, layout = setup.parallel, setup.layout
    features = None
    if setup.features:
        images = ro.images.to(backend.device)
        local_features = embed_latents(lambda x: x, setup.encoder, images, setup.chunk_size).cpu()
        features = parallel.gather(local_features, layout)
    if not setup.measure:
        return None, None, features
    s = setup.settings
    # The group's draw: seeded by its first sample's seed, offset from the initial noise that seed may also draw.
    draw_seeds = draw.group_seeds + 1 if setup.energy_draw == "group" else None
    local = perceive(
        backend,
        setup.encoder,
        ro,
        draw.schedule.sigmas,
        s.guidance,
        setup.decode,
        setup.chunk_size,
        s.batch_size,
        draw_seeds,
    )
    return local, parallel.gather_fields(local, layout), features


def shape_rewards(methods: list[Method], inputs: ShapeInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shaped rewards ``[N]`` (each method in turn) and the normalising subset ``[N]`` (or ``None``)."""
    shaped = inputs.task_rewards
    for method in methods:
        shaped = method.shape(shaped, inputs)
    keep = next((k for m in methods if (k := m.keep(inputs.task_rewards, inputs.group_size)) is not None), None)
    return shaped, keep


class PhaseClock:
    """Wall seconds of the iteration's phases, as ``time_<phase>`` log entries."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time_{phase}"], self._last = now - self._last, now

    @property
    def total(self) -> float:
        return sum(self.times.values())


def log_row(
    iteration: int,
    rewards: torch.Tensor,
    parts: dict[str, torch.Tensor],
    shaped: torch.Tensor,
    ro: Rollout,
    stats: PerceptualStats | None,
    features: torch.Tensor | None,
    adv: Advantages,
    methods: list[Method],
    group_size: int,
) -> dict[str, Any]:
    """One ``log.jsonl`` row: rewards, closed-form policy entropy, perceptual entropy and per-group Vendi
    (when measured), what the advantage step dropped, the trained steps and the methods' own entries."""
    finite = torch.isfinite(rewards)
    row: dict[str, Any] = {
        "iteration": iteration,
        "reward_mean": float(rewards[finite].mean()) if finite.any() else float("nan"),
        "reward_std": float(rewards[finite].std()) if finite.sum() > 1 else 0.0,
        **{f"reward/{k}": float(v[torch.isfinite(v)].mean()) for k, v in parts.items()},
        "shaped_reward_mean": float(shaped[torch.isfinite(shaped)].mean()) if finite.any() else float("nan"),
        "policy_entropy": float(step_entropy(ro.stds, 1).mean()),
    }
    if stats is not None:
        per_group = stats.entropy.reshape(-1, group_size, stats.entropy.shape[1]).mean(1)
        row.update(perceptual_entropy=float(per_group.mean()), perceptual_energy=float(stats.energy.mean()))
    if features is not None:
        row["vendi"] = group_vendi(features, group_size)
    row.update(
        groups_dropped_nan=int(adv.dropped.sum()), groups_zero_std=int(adv.degenerate.sum()), window_steps=ro.steps
    )
    for method in methods:
        row.update(method.log())
    return row


def _probe(setup: Setup, run: RunState, iteration: int, iterations: int, log: RunLog | None) -> None:
    """The fixed probe of the current policy when it is due (every rank runs it: FSDP's forwards are collective)."""
    if setup.probe.due(iteration, iterations):
        s, start = setup, time.perf_counter()
        row = run_probe(s.probe, iteration, run.backend, s.encoder, s.settings, s.decode, s.chunk_size)
        row["time_probe"] = time.perf_counter() - start
        if log is not None:
            log.write(row)


def finish(setup: Setup, run: RunState, config: Config, log: RunLog | None) -> None:
    """Export the final LoRA and write the report (rank 0); the other ranks wait."""
    parallel = setup.parallel
    lora = run.current_lora() if parallel.sharded is not None else None  # every rank joins FSDP's gather
    if parallel.is_main:
        log.close()
        run.export(setup.run_dir / "lora.safetensors", config.train.iterations - 1, lora)
        _write_report(setup.run_dir, run.backend, config, setup.encoder, setup.reward_fn, parallel.sharded is not None)
    parallel.barrier()


def _open_log(config: Config, run_dir: Path, start: int) -> RunLog:
    save_config(config, run_dir / "config.yaml")
    return RunLog(run_dir, start, config.run.tensorboard)


def _write_report(run_dir: Path, backend: Backend, config: Config, encoder, reward_fn, sharded: bool) -> None:
    from .report import write_report

    if sharded:
        # Report sampling would need every rank's shard of the transformer; sample the LoRA afterwards.
        print(f"FSDP run: no report; sample {run_dir / 'lora.safetensors'} with pec sample / pec eval")
        return
    write_report(run_dir, backend, config, encoder, reward_fn, lora_disabled)
