"""GRPO fine-tuning with perceptual-entropy shaping — the training loop, top to bottom.

One iteration (DESIGN §3-§5):
  1. rollout   — P prompts × G samples with the current policy (LoRA on), SDE on the window's steps,
                 storing x, x', μ_old, log p_old per trained step;
  2. reward    — decode the final latents, score them (weighted reward terms);
  3. perceive  — decode x' and μ_old, embed them: residual energy e, perceptual entropy h_A, e_VAE;
  4. shape     — PEC adds β·agg_t(e_t); PCVAE subtracts β·mean_t|ℓ_t - c_t|; DRIFT's diversity shaping;
                 group advantages (over DRIFT's reward-concentrated subset when on);
  5. update    — recompute log p_θ of every stored step, clipped surrogate (+ β_KL·KL to LoRA-off,
                 + the DESIGN §6 terms: Clip-Cov / KL-Cov, entropy regularisation).
  6. log, checkpoint (atomic), and at the end export the LoRA and write the report.

DESIGN §6 methods that change the rollout: E-GRPO (`sampling.window.rule: egrpo`) trains one merged
jump per iteration on a schedule of its own, every group sharing its initial noise; DRIFT's prompt
noise perturbs the stored prompt embeddings.

Every random draw of iteration k comes from generators seeded by (train.seed, k), so a run resumed
from a checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from comfy_pec import PECError, __version__
from comfy_pec.diversity import pcvae_gain, pcvae_penalty, pec_bonus, vendi_score
from comfy_pec.lora_format import save_lora
from comfy_pec.sde import (
    MergedStep,
    egrpo_merge_steps,
    egrpo_schedule,
    flow_sde_stds,
    gaussian_kl,
    gaussian_log_prob,
    sample_window_start,
    step_entropy,
    stochastic_steps,
)

from .backends import Backend, PromptEmbeds, load_backend
from .checkpoint import latest_checkpoint, load_state, save_checkpoint
from .config import Config, ConfigError, save_config
from .distributed import SINGLE_PROCESS, LocalAdvantages, Parallel, plan_layout
from .drift import PromptNoise, drift_diversity_shaping, prompt_noise_std, reward_concentrated_subset
from .fsdp import full_lora_state, full_optimizer_state, load_optimizer_state, lora_parameters, shard_transformer
from .grpo import Advantages, clipped_surrogate, group_advantages
from .loss_terms import (
    clip_cov_detach,
    kl_cov_penalty,
    native_entropy_bonus,
    perceptual_entropy_bonus,
    top_covariance_mask,
)
from .perceptual import PerceptualStats, embed_latents, measure_steps
from .prompts import resolve_prompts
from .rewards import build_reward
from .runlog import RunLog
from .sampling import SDE_STEPS, NoiseLevel, StepRecord, denoise, seeded_noise, step_noise_level


class TrainingError(PECError):
    """The run cannot go on (e.g. rewards NaN too many iterations in a row); a checkpoint was saved."""


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def add_lora(backend: Backend, config: Config) -> list[torch.nn.Parameter]:
    """Attach the trainable LoRA (PEFT) to the backend's transformer; returns its parameters."""
    from peft import LoraConfig

    lora = config.lora
    backend.transformer.add_adapter(
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), init_lora_weights=True)
    )
    params = [p for n, p in backend.transformer.named_parameters() if "lora_" in n]
    if not params:
        raise PECError(f"lora.targets {lora.targets} match no module of this model")
    if lora.init_scale > 0:
        gen = torch.Generator().manual_seed(config.train.seed)
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=gen) * lora.init_scale)
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
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(backend.transformer).items()}


def set_lora_state(backend: Backend, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(backend.transformer, state)


# --------------------------------------------------------------------------------------------------
# One iteration's pieces
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Everything one iteration sampled; N = P·G samples (group-contiguous), T trained steps."""

    prompts: list[str]  # [N]
    cond: PromptEmbeds  # [N, ...]
    latents: torch.Tensor  # x before each trained step [N, T, ...]
    next_latents: torch.Tensor  # x' [N, T, ...]
    means: torch.Tensor  # μ_old [N, T, ...]
    next_x0: torch.Tensor  # x̂0(x') [N, T, ...]
    log_probs: torch.Tensor  # log p_old [N, T]
    stds: torch.Tensor  # std_step [T]
    steps: list[int]  # indices of the trained steps [T]
    images: torch.Tensor  # final images [N, 3, H, W] in [0, 1], CPU


def _stack(records: list[list[StepRecord]], field: str) -> torch.Tensor:
    """Per-batch lists of T records → ``[N, T, ...]``."""
    return torch.cat([torch.stack([getattr(r, field) for r in batch], dim=1) for batch in records])


@torch.no_grad()
def rollout(
    backend: Backend,
    prompts: list[str],
    config: Config,
    sigmas: torch.Tensor,
    stochastic: torch.Tensor,
    seeds: torch.Tensor,
    guidance: float,
    noise_level: NoiseLevel,
    resolution: int,
    init_seeds: torch.Tensor | None = None,
    prompt_noise: PromptNoise | None = None,
) -> Rollout:
    """Sample ``prompts`` (one entry per sample) in micro-batches, recording the trained steps.

    ``seeds`` ``[N]`` seed each sample's noise; ``init_seeds`` ``[N]``, when given, seed the initial
    noise instead (E-GRPO: one per group, so the group shares its ODE prefix). ``prompt_noise``: DRIFT's
    perturbation of the prompt embeddings.
    """
    batch = config.train.batch_size
    shape = backend.latent_shape(resolution, resolution)
    records, conds, images = [], [], []
    backend.cache_prompts(prompts)  # one text-encoder pass (and move, when offloaded) per iteration
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch]]
        init_gens = (
            gens
            if init_seeds is None
            else [torch.Generator().manual_seed(int(s)) for s in init_seeds[start : start + batch]]
        )
        cond = backend.encode_prompts(part)
        if prompt_noise is not None:
            cond = prompt_noise(cond, slice(start, start + batch))
        final, recs = denoise(
            backend,
            seeded_noise((len(part), *shape), init_gens, backend.device),
            cond,
            sigmas,
            guidance_scale=guidance,
            sde=config.sampling.sde,
            noise_level=noise_level,
            stochastic=stochastic,
            generators=gens,
            log_prob_reduction=config.train.log_prob_reduction,
            record=True,
        )
        records.append(recs)
        conds.append(cond)
        images.append(backend.decode(final).cpu())
    first = records[0]
    return Rollout(
        prompts=list(prompts),
        cond=PromptEmbeds.cat(conds),
        latents=_stack(records, "latents"),
        next_latents=_stack(records, "next_latents"),
        means=_stack(records, "mean"),
        next_x0=_stack(records, "next_x0"),
        log_probs=_stack(records, "log_prob"),
        stds=torch.stack([r.std.reshape(()) for r in first]).cpu(),
        steps=[r.index for r in first],
        images=torch.cat(images),
    )


@torch.no_grad()
def perceive(
    backend: Backend, encoder, ro: Rollout, config: Config, sigmas: torch.Tensor, guidance: float
) -> PerceptualStats:
    """DESIGN §5 on the rollout buffer; ``pec.decode: x0`` decodes clean predictions instead of x', μ_old."""
    targets = None
    if config.pec.decode == "x0":
        # x̂0(x') came free with the rollout; x̂0(μ_old) needs one forward per step at σ'.
        mean_x0 = torch.empty_like(ro.means)
        for j, i in enumerate(ro.steps):
            sigma_next = float(sigmas[i + 1])
            for s in range(0, len(ro.prompts), config.train.batch_size):
                sl = slice(s, s + config.train.batch_size)
                mu = ro.means[sl, j]
                v = backend.velocity(mu, sigma_next, ro.cond.select(sl), guidance)
                mean_x0[sl, j] = mu - sigma_next * v
        targets = (ro.next_x0, mean_x0)
    return measure_steps(
        backend.decode, encoder, ro.next_latents, ro.means, ro.stds, config.pec.chunk_size, targets=targets
    )


def shaped_rewards(
    rewards: torch.Tensor,
    stats: PerceptualStats,
    config: Config,
    calibration: torch.Tensor | None,
    steps: list[int],
    features: torch.Tensor,
) -> torch.Tensor:
    """Task reward plus the PEC bonus or minus the PCVAE penalty (DESIGN §5), then DRIFT's diversity
    shaping (DESIGN §6) when ``drift.diversity_alpha > 0``; ``[N]``.

    ``calibration`` holds PCVAE's anchor for every step index; ``steps`` are this rollout's trained steps;
    ``features`` ``[N, d_f]`` are the final images' perceptual features.
    """
    pec = config.pec
    shaped = rewards
    if pec.method == "pec":
        bonus = pec_bonus(stats.energy, config.train.group_size, pec.step_norm, clip=pec.bonus_clip)
        shaped = rewards + pec.beta * bonus
    elif pec.method == "pcvae":
        gain = pcvae_gain(stats.energy, stats.latent_energy, stats.feat_dim, stats.latent_dim)
        shaped = rewards - pec.beta * pcvae_penalty(gain, calibration[steps], one_sided=pec.one_sided)
    alpha = config.drift.diversity_alpha
    return drift_diversity_shaping(shaped, rewards, features, config.train.group_size, alpha) if alpha > 0 else shaped


def update(
    backend: Backend,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    ro: Rollout,
    adv: Advantages | LocalAdvantages,
    config: Config,
    sigmas: torch.Tensor,
    guidance: float,
    noise_level: NoiseLevel,
    encoder=None,
    perceptual: PerceptualStats | None = None,
    parallel: Parallel = SINGLE_PROCESS,
) -> dict[str, float]:
    """Policy-gradient update on the stored steps; one optimizer step per micro-batch.

    Under several processes ``ro``, ``adv`` (a :class:`LocalAdvantages`) and ``perceptual`` are this
    rank's samples; a micro-batch spans all ranks and the loss is weighted so the rank-averaged
    gradient is the mean over its trained samples, as in one process.

    ``encoder`` is needed by perceptual entropy regularisation, ``perceptual`` (the rollout's stats) by
    the perceptual ranking of Clip-Cov / KL-Cov.
    """
    t = config.train
    step_fn = SDE_STEPS[config.sampling.sde]
    sigma_1 = float(sigmas[1])
    clip_high = t.clip_range_high or t.clip_range
    trained = adv.trained
    step_stats: dict[str, list[float]] = {}
    grad_norms: list[float] = []
    for _ in range(t.inner_epochs):
        for start in range(0, len(ro.prompts), t.batch_size):
            sl = slice(start, start + t.batch_size)
            mask = trained[sl].to(backend.device)
            share = parallel.loss_share(int(mask.sum()))
            if share is None:
                continue
            if not share and parallel.sharded is not None:
                # FSDP's forwards and backwards are collectives every rank must join: with no trained sample
                # here, run the whole micro-batch at weight 0 (zero gradient, the other ranks' calls).
                mask = torch.ones_like(mask)
            cond = ro.cond.select(sl)
            uncond = backend.empty_embeds(mask.shape[0])
            a = adv.values[sl].to(backend.device)[mask]
            # no trained sample on this rank (DDP): only join the gradient average
            steps = ro.steps if share or parallel.sharded is not None else []
            for j, i in enumerate(steps):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                level = step_noise_level(noise_level, i)
                x = ro.latents[sl, j]
                v = backend.velocity(x, sigma, cond, guidance, uncond)
                res = step_fn(x, v, sigma, sigma_next, level, noise=torch.zeros_like(x), sigma_1=sigma_1)
                log_prob = gaussian_log_prob(ro.next_latents[sl, j], res.mean, res.std, t.log_prob_reduction)[mask]
                selected = None
                if t.cov.kind != "none":
                    ranked = (
                        log_prob if t.cov.space == "native" else -perceptual.entropy[sl, j].to(backend.device)[mask]
                    )
                    selected = top_covariance_mask(ranked, a, t.cov.fraction)
                    if t.cov.kind == "clip_cov":
                        log_prob = clip_cov_detach(log_prob, selected)
                loss, stats = clipped_surrogate(log_prob, ro.log_probs[sl, j][mask], a, t.clip_range, clip_high)
                stats["policy_loss"] = loss.detach()
                if t.kl_beta > 0:
                    with torch.no_grad(), lora_disabled(backend):
                        v_ref = backend.velocity(x, sigma, cond, guidance, uncond)
                        mean_ref = step_fn(
                            x, v_ref, sigma, sigma_next, level, noise=torch.zeros_like(x), sigma_1=sigma_1
                        ).mean
                    kl = gaussian_kl(res.mean, mean_ref, res.scale if t.kl_flow_grpo_compat else res.std)[mask].mean()
                    loss = loss + t.kl_beta * kl
                    stats["kl"] = kl.detach()
                if selected is not None:
                    stats["cov_frac"] = selected.float().mean()
                if t.cov.kind == "kl_cov":
                    kl_old = gaussian_kl(res.mean, ro.means[sl, j].to(backend.device), res.std)[mask]
                    penalty = kl_cov_penalty(kl_old, selected)
                    loss = loss + t.cov.kl_beta * penalty
                    stats["kl_cov"] = penalty.detach()
                if t.entropy_reg.kind != "none":
                    bonus = entropy_bonus(
                        backend, encoder, config, ro.next_latents[sl, j][mask], res.mean[mask], res.std
                    )
                    loss = loss - t.entropy_reg.beta * bonus
                    stats["entropy_reg"] = bonus.detach()
                (loss * share / len(ro.steps)).backward()
                for key, value in stats.items() if share else ():
                    step_stats.setdefault(key, []).append(float(value))
            parallel.average_gradients(params)
            grad_norms.append(float(parallel.clip_grad_norm(params, t.grad_clip)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    out = {key: sum(values) / len(values) for key, values in step_stats.items()}
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out


def entropy_bonus(backend: Backend, encoder, config: Config, next_latents, mean, std) -> torch.Tensor:
    """Entropy regularisation's bonus of one step (DESIGN §6), mean over the ``[B]`` transitions; differentiable."""
    reg = config.train.entropy_reg
    if reg.kind == "native":
        return native_entropy_bonus(next_latents, mean, std).mean()
    return perceptual_entropy_bonus(lambda z: encoder(backend.decode(z)), next_latents, mean, std, reg.chunk_size)


def group_vendi(features: torch.Tensor, group_size: int) -> float:
    """Mean per-group Vendi score of the final images' perceptual ``features`` ``[N, d_f]``."""
    return float(vendi_score(features.reshape(-1, group_size, features.shape[-1])).mean())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def group_initial_seeds(seeds: torch.Tensor, group_size: int, shared: bool) -> torch.Tensor | None:
    """Seeds of the initial noise ``[N]`` when a group shares it (each group's first seed, repeated), else
    ``None`` (every sample starts from its own seed). E-GRPO shares it so a group shares its ODE prefix up
    to the merged jump; ``sampling.shared_init_noise`` (DanceGRPO) so the in-group reward spread comes
    from the trained SDE steps."""
    if not shared:
        return None
    return seeds.reshape(-1, group_size)[:, :1].expand(-1, group_size).reshape(-1)


def _iteration_rng(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def _ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    for key, value in current.items():
        ema[key].mul_(decay).add_(value.cpu(), alpha=1.0 - decay)


def train(config: Config, resume: bool = True, progress: bool | None = None, backend: Backend | None = None) -> Path:
    """Run (or resume) GRPO training; returns the run directory.

    ``resume=True`` continues from the newest complete checkpoint in ``config.run.dir`` when there is
    one (a run directory with a different configuration fingerprint is refused). ``backend``: an
    already built model (e.g. randomly initialised in memory) instead of loading ``config.model``.

    Started by ``accelerate launch`` on several processes, each rank draws its share of every
    iteration's samples (:mod:`trainer.distributed`); rank 0 writes the log, checkpoints and exports.
    """
    from comfy_pec.encoders import load_encoder

    t, s = config.train, config.sampling
    parallel = Parallel.from_environment()
    total = t.prompts_per_iteration * t.group_size
    layout = plan_layout(total, t.group_size, t.batch_size, parallel.world, parallel.rank, config.distributed.sampler)
    if config.distributed.fsdp.enabled and parallel.world == 1:
        raise ConfigError("distributed.fsdp.enabled shards the model over processes: start with accelerate launch")
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = (config.run.progress if progress is None else progress) and parallel.is_main

    # -- model, adapter, optimizer ----------------------------------------------------------------
    m = config.model
    backend = backend or load_backend(
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
    torch.manual_seed(t.seed)  # PEFT draws lora_A's init from the global generator
    params = add_lora(backend, config)
    found = latest_checkpoint(run_dir) if resume else None
    state = load_state(found) if found is not None else None
    if state is not None:
        if state["fingerprint"] != config.fingerprint():
            raise PECError(
                f"{run_dir} holds a run with another configuration (hash {state['fingerprint']} vs "
                f"{config.fingerprint()}); use a new run.dir or the same config"
            )
        set_lora_state(backend, state["lora"])  # before FSDP, which then shards the loaded weights
    if config.distributed.fsdp.enabled:
        parallel.sharded = shard_transformer(backend, config.distributed.fsdp.activation_checkpointing)
        params = lora_parameters(parallel.sharded)
    if m.compile:
        backend.set_network(torch.compile(backend.network))

    def current_lora() -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} on the CPU (under FSDP gathered on rank 0, empty elsewhere; all ranks call it)."""
        return (
            lora_state(backend) if parallel.sharded is None else full_lora_state(parallel.sharded, backend.transformer)
        )

    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    ema = current_lora() if t.ema.enabled else None
    encoder = load_encoder(
        config.pec.encoder, normalize=config.pec.normalize_features, device=backend.device, path=config.pec.encoder_path
    )
    reward_fn = build_reward(config.rewards)
    prompts = resolve_prompts(config.prompts.train)

    d = backend.defaults
    resolution = int(s.resolution or d["resolution"])
    num_steps = int(s.num_steps or d["num_steps"])
    guidance = float(d["guidance_scale"] if s.guidance_scale is None else s.guidance_scale)
    noise_level = float(s.noise_level or d["noise_level"])
    sigmas = backend.schedule(num_steps, resolution, resolution)
    jumps = _egrpo_jumps(config, sigmas, noise_level)  # None unless sampling.window.rule is egrpo

    # -- resume -----------------------------------------------------------------------------------
    start, calibration = 0, None
    if state is not None:
        if parallel.sharded is None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            load_optimizer_state(parallel.sharded, optimizer, state["optimizer"])
        ema = state["ema"]
        calibration = state["calibration"]
        # Ranks draw nothing from the global generator after the seeded LoRA init: rank 0's state is everyone's.
        torch.set_rng_state(state["torch_rng"])
        start = state["iteration"] + 1
        if parallel.is_main:
            print(f"resuming {run_dir} from {found.name} (iteration {start} of {t.iterations})")
    log = None
    if parallel.is_main:
        save_config(config, run_dir / "config.yaml")
        log = RunLog(run_dir, start, config.run.tensorboard)
    nan_streak = 0  # iterations in a row with a NaN reward (restarts at 0 on resume)

    def export(path: Path, iteration: int, extra: dict | None = None, lora: dict | None = None) -> None:
        """``lora``: the gathered LoRA under FSDP (the sharded transformer cannot be read directly)."""
        source: Any = ema if ema is not None else (backend.transformer if lora is None else lora)
        save_lora(
            source,
            path,
            alpha=None if source is backend.transformer else config.lora.alpha,
            dtype=torch.float32,
            architecture=backend.architecture,
            base_model=config.model.path or "pec-embedded-toy",
            title=f"PEC {config.pec.method} LoRA",
            resolution=resolution,
            provenance={
                "method": config.pec.method if config.pec.method != "none" else "flow-grpo",
                "beta": config.pec.beta,
                "encoder": config.pec.encoder,
                "rewards": {r.name: r.weight for r in config.rewards},
                "noise_level": noise_level,
                "group_size": t.group_size,
                "global_step": iteration + 1,
                "config_hash": config.fingerprint(),
                "base_model_revision": config.model.revision or "",
                **(extra or {}),
            },
        )

    def checkpoint(iteration: int) -> Path | None:
        """Every rank calls it (FSDP gathers); rank 0 writes."""
        lora, sharded = current_lora(), parallel.sharded
        state = {
            "iteration": iteration,
            "fingerprint": config.fingerprint(),
            "lora": lora,
            "optimizer": optimizer.state_dict() if sharded is None else full_optimizer_state(sharded, optimizer),
            "ema": ema,
            "calibration": calibration,
            "torch_rng": torch.get_rng_state(),
            "version": __version__,
        }
        if not parallel.is_main:
            return None
        exported = None if sharded is None else lora
        return save_checkpoint(
            run_dir, iteration, state, lambda p: export(p, iteration, lora=exported), config.checkpoint.keep
        )

    # -- PCVAE calibration on the reference policy (once, stored in checkpoints) ------------------
    if config.pec.method == "pcvae" and calibration is None:
        calibration = calibrate_pcvae(backend, encoder, prompts, config, sigmas, guidance, noise_level, resolution)

    bar = tqdm(range(start, t.iterations), desc="train", disable=not progress, initial=start, total=t.iterations)
    for it in bar:
        times: dict[str, float] = {}
        clock = time.perf_counter()
        gen = _iteration_rng(t.seed, it)
        chosen = torch.randint(len(prompts), (t.prompts_per_iteration,), generator=gen).tolist()
        batch_prompts = [prompts[c] for c in chosen for _ in range(t.group_size)]
        seeds = torch.randint(2**62, (len(batch_prompts),), generator=gen)
        it_sigmas, stochastic, it_noise, jump = _schedule(config, sigmas, noise_level, jumps, it, gen)
        init_seeds = group_initial_seeds(seeds, t.group_size, jump is not None or config.sampling.shared_init_noise)
        prompt_noise = _prompt_noise(config, it, gen, len(batch_prompts))
        # This rank's samples of the global draws above (all of them in one process).
        batch_prompts, seeds, init_seeds = layout.mine(batch_prompts), layout.mine(seeds), layout.mine(init_seeds)
        if prompt_noise is not None:
            prompt_noise = dataclasses.replace(prompt_noise, seeds=layout.mine(prompt_noise.seeds))

        ro = rollout(
            backend,
            batch_prompts,
            config,
            it_sigmas,
            stochastic,
            seeds,
            guidance,
            it_noise,
            resolution,
            init_seeds,
            prompt_noise,
        )
        times["time_rollout"], clock = time.perf_counter() - clock, time.perf_counter()
        rewards, parts = reward_fn(ro.images, ro.prompts)
        rewards, parts = parallel.gather(rewards, layout), {k: parallel.gather(v, layout) for k, v in parts.items()}
        times["time_reward"], clock = time.perf_counter() - clock, time.perf_counter()
        local_stats = stats = features = None
        perceptual_log = {}
        if config.run.perceptual_stats or config.uses_perceptual_stats:
            local_stats = perceive(backend, encoder, ro, config, it_sigmas, guidance)
            stats = parallel.gather_fields(local_stats, layout)  # whole groups: PEC's z-score, DRIFT's diversity
            features = embed_latents(lambda x: x, encoder, ro.images.to(backend.device), config.pec.chunk_size).cpu()
            features = parallel.gather(features, layout)
            perceptual_log = {
                "perceptual_entropy": float(
                    stats.entropy.reshape(-1, t.group_size, stats.entropy.shape[1]).mean(1).mean()
                ),
                "perceptual_energy": float(stats.energy.mean()),
                "vendi": group_vendi(features, t.group_size),
            }
        times["time_perceptual"], clock = time.perf_counter() - clock, time.perf_counter()

        shaped = shaped_rewards(rewards, stats, config, calibration, ro.steps, features)
        keep = (
            reward_concentrated_subset(rewards, t.group_size, config.drift.subset_threshold)
            if config.drift.subset
            else None
        )
        adv = group_advantages(shaped, t.group_size, t.adv_std, t.adv_clip, keep=keep)
        nan_streak = nan_streak + 1 if bool(adv.dropped.any()) else 0
        upd = {}
        if bool(adv.trained.any()):
            upd = update(
                backend,
                optimizer,
                params,
                ro,
                layout.local_advantages(adv),
                config,
                it_sigmas,
                guidance,
                it_noise,
                encoder,
                local_stats,
                parallel,
            )
            if ema is not None:
                _ema_update(ema, current_lora(), t.ema.decay)
        times["time_update"] = time.perf_counter() - clock

        finite = torch.isfinite(rewards)
        row = {
            "iteration": it,
            "reward_mean": float(rewards[finite].mean()) if finite.any() else float("nan"),
            "reward_std": float(rewards[finite].std()) if finite.sum() > 1 else 0.0,
            **{f"reward/{k}": float(v[torch.isfinite(v)].mean()) for k, v in parts.items()},
            "shaped_reward_mean": float(shaped[torch.isfinite(shaped)].mean()) if finite.any() else float("nan"),
            "policy_entropy": float(step_entropy(ro.stds, 1).mean()),
            **perceptual_log,
            "groups_dropped_nan": int(adv.dropped.sum()),
            "groups_zero_std": int(adv.degenerate.sum()),
            "window_steps": ro.steps,
            **_method_log(jump, prompt_noise, keep),
            **({"advantages": adv.values.tolist()} if config.run.log_advantages else {}),
            "processes": parallel.world,
            **upd,
            **times,
            "time_total": sum(times.values()),
        }
        if log is not None:
            log.write(row)
        bar.set_postfix(
            reward=f"{row['reward_mean']:.3f}", vendi=f"{row.get('vendi', float('nan')):.2f}", refresh=False
        )

        last = it == t.iterations - 1
        if nan_streak >= t.nan_patience:
            folder = checkpoint(it)
            if log is not None:
                log.close()
            raise TrainingError(
                f"rewards were NaN in {nan_streak} iterations in a row (last: {it}); stopped after saving "
                f"{folder}. Check the reward models and the prompts."
            )
        if (it + 1) % config.checkpoint.every == 0 or last:
            checkpoint(it)
    lora = current_lora() if parallel.sharded is not None else None
    if parallel.is_main:
        log.close()
        export(run_dir / "lora.safetensors", t.iterations - 1, lora=lora)
        _write_report(run_dir, backend, config, encoder, reward_fn, sharded=parallel.sharded is not None)
    parallel.barrier()  # the other ranks wait for rank 0's export and report
    return run_dir


def _write_report(run_dir: Path, backend: Backend, config: Config, encoder, reward_fn, sharded: bool) -> None:
    from .report import write_report

    if sharded:
        # Report sampling would need every rank's shard of the transformer; sample the LoRA afterwards.
        print(f"FSDP run: no report; sample {run_dir / 'lora.safetensors'} with pec sample / pec eval")
        return
    write_report(run_dir, backend, config, encoder, reward_fn, lora_disabled)


def _window(config: Config, num_steps: int, iteration: int, gen: torch.Generator) -> torch.Tensor:
    w = config.sampling.window
    if w.rule == "window":
        start = sample_window_start(w.start_min, w.start_max, gen)
        return stochastic_steps("window", num_steps, size=w.size, start=start)
    return stochastic_steps(
        w.rule, num_steps, size=w.size, iteration=iteration, shift_every=w.shift_every, stride=w.stride
    )


def _egrpo_jumps(config: Config, sigmas: torch.Tensor, noise_level: float) -> list[MergedStep] | None:
    """E-GRPO's merged jumps of the run's schedule (DESIGN §6), fixed for the run."""
    if config.sampling.window.rule != "egrpo":
        return None
    tau = config.sampling.window.tau
    stds = flow_sde_stds(sigmas, noise_level)
    jumps = egrpo_merge_steps(stds, tau)
    if not jumps:
        entropies = ", ".join(f"{float(h):.2f}" for h in step_entropy(stds[:-1], 1))
        raise PECError(
            f"E-GRPO: no step, merged or not, reaches sampling.window.tau={tau} (step entropies: {entropies}); lower tau"
        )
    return jumps


def _schedule(config: Config, sigmas, noise_level: float, jumps: list[MergedStep] | None, iteration: int, gen):
    """This iteration's ``(sigmas, stochastic mask, noise level(s), E-GRPO jump or None)``."""
    if jumps is None:
        return sigmas, _window(config, len(sigmas) - 1, iteration, gen), noise_level, None
    jump = jumps[iteration % len(jumps)]  # every merged jump in turn, noisiest first
    return (*egrpo_schedule(sigmas, jump, noise_level), jump)


def _prompt_noise(config: Config, iteration: int, gen: torch.Generator, samples: int) -> PromptNoise | None:
    """DRIFT's annealed prompt-embedding noise of this iteration (None when off)."""
    d = config.drift
    if d.prompt_noise == 0:
        return None
    std = prompt_noise_std(d.prompt_noise, iteration, d.prompt_noise_anneal or config.train.iterations)
    return PromptNoise(std, torch.randint(2**62, (samples,), generator=gen))


def _method_log(jump: MergedStep | None, prompt_noise: PromptNoise | None, keep: torch.Tensor | None) -> dict:
    """Log-row entries of the DESIGN §6 rollout-side methods that are switched on."""
    row: dict[str, Any] = {}
    if jump is not None:
        row.update(egrpo_merged_steps=list(range(jump.start, jump.start + jump.length)), egrpo_jump_std=jump.std)
    if prompt_noise is not None:
        row["prompt_noise_std"] = prompt_noise.std
    if keep is not None:
        row["drift_kept_frac"] = float(keep.float().mean())
    return row


@torch.no_grad()
def calibrate_pcvae(backend, encoder, prompts, config, sigmas, guidance, noise_level, resolution) -> torch.Tensor:
    """PCVAE's anchor ``c_t``: the mean gain ℓ per trained step of the LoRA-off policy (DESIGN §5)."""
    t = config.train
    gen = _iteration_rng(t.seed, -1)
    chosen = torch.randint(len(prompts), (t.prompts_per_iteration,), generator=gen).tolist()
    batch_prompts = [prompts[c] for c in chosen for _ in range(t.group_size)]
    seeds = torch.randint(2**62, (len(batch_prompts),), generator=gen)
    stochastic = stochastic_steps("all", len(sigmas) - 1)
    with lora_disabled(backend):
        ro = rollout(backend, batch_prompts, config, sigmas, stochastic, seeds, guidance, noise_level, resolution)
        stats = perceive(backend, encoder, ro, config, sigmas, guidance)
    gain = pcvae_gain(stats.energy, stats.latent_energy, stats.feat_dim, stats.latent_dim)
    # One value per step index (the last step is never stochastic): windowed runs pick theirs.
    return torch.cat([gain.mean(dim=0), gain.new_zeros(1)])
