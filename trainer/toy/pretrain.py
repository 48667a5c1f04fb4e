"""Pre-train the embedded tiny SD3 model (:mod:`trainer.toy.model`) from scratch on the shapes world.

``pec toy pretrain`` runs :func:`pretrain`, in four phases, each with a progress bar:

1. data: render ``n_images`` (image, caption) pairs of the *train* split of
   :class:`~trainer.world.scenes.ShapesDataset` (the held-out colour x shape pairs never occur, not
   even as the second object of a pair), kept in memory as uint8;
2. VAE: L1 reconstruction of the posterior mean plus a little Gaussian latent noise (the decoder
   learns to tolerate imperfect latents, which the flow model's samples are) and a small KL term;
   then ``shift_factor`` / ``scaling_factor`` are set so that the scaled posterior means have
   zero mean and unit variance; reconstructions are checked with the adherence reward;
3. latents: every image encoded once (posterior mean, scaled, as the backend does);
4. flow: transformer and both text encoders trained jointly with the rectified-flow loss
   ``||v_θ(x_σ, σ, c) - (ε - x0)||²``, ``x_σ = (1-σ)·x0 + σ·ε``, σ logit-normal; captions are
   dropped to "" with probability ``caption_dropout`` (classifier-free guidance); AdamW with
   warm-up and cosine decay; an exponential moving average of the weights is what gets saved.

The model is driven through :class:`trainer.backends.sd3.SD3Backend` (``encode_prompts``,
``velocity``, ``encode_images``) -- the code path every later sampling and GRPO run uses.
Everything is seeded: the same arguments on the same machine give the same weights.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backends.base import read_defaults
from ..backends.random_init import build_pipeline, save_pipeline
from ..world.scenes import Scene, ShapesDataset, render
from .model import EMBEDDED_SPEC, PEC_DEFAULTS, load_pipeline

#: the recipe of the shipped weights (``pec toy pretrain`` with no options).
PRETRAIN_DEFAULTS = dict(
    seed=0,
    n_images=40_000,
    p_second=0.25,
    vae_steps=2000,
    vae_batch_size=16,
    vae_lr=1e-3,
    kl_weight=1e-4,
    latent_noise=0.1,
    steps=3000,
    batch_size=64,
    lr=5e-4,
    weight_decay=0.01,
    warmup=200,
    ema_decay=0.999,
    caption_dropout=0.1,
    logit_mean=0.0,
    logit_std=1.0,
)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _render_chunk(args) -> tuple[np.ndarray, list[str], list[Scene]]:
    kwargs, start, stop = args
    ds = ShapesDataset(**kwargs, as_tensor=False)
    scenes = [ds.scene(i) for i in range(start, stop)]
    return (np.stack([render(sc, ds.size) for sc in scenes]), [ds.caption(i) for i in range(start, stop)], scenes)


def render_dataset(
    n: int,
    seed: int,
    *,
    p_second: float = 0.2,
    p_size: float = 0.3,
    p_position: float = 0.3,
    split: str = "train",
    workers: int = 2,
    chunk: int = 1000,
    progress: bool = True,
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Items ``0..n-1`` of a :class:`ShapesDataset`: uint8 images [n, 3, 64, 64], captions, scenes.

    Rendered in ``workers`` processes; the result does not depend on ``workers`` or ``chunk``.
    """
    kwargs = dict(n=n, seed=seed, split=split, p_second=p_second, p_size=p_size, p_position=p_position)
    jobs = [(kwargs, s, min(s + chunk, n)) for s in range(0, n, chunk)]
    images, captions, scenes = [], [], []
    bar = tqdm(total=n, desc="render", unit="img", disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    for imgs, caps, scs in pool.map(_render_chunk, jobs) if pool else map(_render_chunk, jobs):
        images.append(imgs)
        captions += caps
        scenes += scs
        bar.update(len(caps))
    if pool:
        pool.shutdown()
    bar.close()
    images = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous()
    return images, captions, scenes


def _to_float(images_u8: torch.Tensor, device) -> torch.Tensor:
    return images_u8.to(device, torch.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def _cosine_lr(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_vae(
    vae,
    images_u8: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    latent_noise: float,
    seed: int,
    device="cpu",
    progress: bool = True,
) -> dict:
    """Train ``vae`` in place on uint8 images [N, 3, H, W]; returns the final smoothed losses.

    Loss per batch: mean |x - D(z)| over pixels in [-1, 1], plus ``kl_weight`` times the KL to
    N(0, I) averaged over latent elements (keeps the latents bounded). z is the posterior mean
    plus Gaussian noise of ``latent_noise`` times the batch's latent std: sampling the learned
    posterior instead starts at std 1 and drowns the signal for the first thousands of steps,
    while a fixed small noise still teaches the decoder to tolerate imperfect latents (the flow
    model's samples carry some).
    """
    gen = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, steps // 20))
    stats = {"l1": float("nan"), "kl": float("nan")}
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(images_u8), (batch_size,), generator=gen)
        x = _to_float(images_u8[idx], device) * 2.0 - 1.0
        post = vae.encode(x).latent_dist
        scale = latent_noise * post.mean.detach().std()
        z = post.mean + scale * torch.randn(post.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        for k, v in (("l1", l1), ("kl", kl)):
            stats[k] = v.item() if math.isnan(stats[k]) else 0.98 * stats[k] + 0.02 * v.item()
        bar.set_postfix(l1=f"{stats['l1']:.4f}", kl=f"{stats['kl']:.3f}")
    vae.eval()
    return stats


@torch.no_grad()
def encode_latents(backend, images_u8: torch.Tensor, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Scaled posterior-mean latents [N, C, h, w] of uint8 images (``backend.encode_images``)."""
    out = []
    for start in tqdm(range(0, len(images_u8), batch_size), desc="latents", disable=not progress):
        out.append(backend.encode_images(_to_float(images_u8[start : start + batch_size], backend.device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def calibrate_latent_scale(vae, images_u8: torch.Tensor, batch_size: int = 256, device="cpu") -> tuple[float, float]:
    """Set the VAE's ``shift_factor`` / ``scaling_factor`` to the mean / 1/std of its posterior
    means over ``images_u8``; returns them."""
    means = []
    for start in range(0, len(images_u8), batch_size):
        x = _to_float(images_u8[start : start + batch_size], device) * 2.0 - 1.0
        means.append(vae.encode(x).latent_dist.mean.double().cpu())
    z = torch.cat(means)
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def train_flow(
    backend,
    latents: torch.Tensor,
    captions: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    ema_decay: float,
    caption_dropout: float,
    logit_mean: float,
    logit_std: float,
    seed: int,
    progress: bool = True,
) -> dict:
    """Train the backend's transformer and both text encoders with the rectified-flow loss.

    ``latents``: scaled latents [N, C, h, w] (CPU); ``captions``: N strings. At the end the
    modules hold the EMA of their weights. Returns the final smoothed loss.
    """
    pipe, device = backend.pipe, backend.device
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    smooth = float("nan")
    bar = tqdm(range(steps), desc="flow", disable=not progress)
    for step in bar:
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = latents[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=gen))
        sigma = sigma.to(device)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise
        v = backend.velocity(x_t, sigma, backend.encode_prompts(prompts))
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA with a warm-up of its own (short runs still average only trained weights)
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1.0 - decay)
        smooth = loss.item() if math.isnan(smooth) else 0.99 * smooth + 0.01 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    for m in modules:
        m.eval().requires_grad_(False)
    return {"loss": smooth}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def pretrain(
    out_dir: str | Path,
    *,
    save_dtype: torch.dtype = torch.float16,
    defaults: dict | None = None,
    device: str = "cpu",
    workers: int = 2,
    init_from: str | Path | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train the tiny SD3 pipeline from scratch and save it to ``out_dir``.

    ``overrides`` replace entries of :data:`PRETRAIN_DEFAULTS` (``seed``, ``n_images``,
    ``vae_steps``, ``steps``, ``batch_size``, ...). ``save_dtype`` is the dtype of the saved
    weights (float16 halves the shipped files; the backend loads them in float32). ``defaults``
    override the sampling defaults written to ``pec.json`` (the recipe is stored there too, under
    ``"pretrain"``). Returns a report: wall time per phase (s), final losses, the latent
    shift/scale, and the adherence of VAE reconstructions vs the originals (256 fresh images).

    ``init_from``: a saved toy pipeline to continue from -- its VAE (and latent scale) is kept,
    the VAE phase is skipped, and the flow phase trains its transformer and text encoders for
    ``steps`` more steps (so a long pre-training can be done in several sittings). Its recipe
    is kept in ``pec.json`` under ``"pretrain"."continues"``.
    """
    from ..backends.sd3 import SD3Backend
    from ..world.rewards import adherence_reward

    unknown = set(overrides) - set(PRETRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pre-training settings {sorted(unknown)}")
    r = {**PRETRAIN_DEFAULTS, **overrides}
    if init_from is not None:
        r["continues"] = read_defaults(str(init_from), PEC_DEFAULTS).get("pretrain")
    seed = int(r["seed"])
    report: dict = {"recipe": r, "time_s": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["time_s"][name] = round(now - clock, 1)
        clock = now

    images, captions, _ = render_dataset(
        r["n_images"], seed, p_second=r["p_second"], workers=workers, progress=progress
    )
    lap("data")

    if init_from is None:
        pipe = build_pipeline(EMBEDDED_SPEC, seed).to(device)
        report["vae"] = train_vae(
            pipe.vae,
            images,
            steps=r["vae_steps"],
            batch_size=r["vae_batch_size"],
            lr=r["vae_lr"],
            kl_weight=r["kl_weight"],
            latent_noise=r["latent_noise"],
            seed=seed + 1,
            device=device,
            progress=progress,
        )
        report["vae"]["shift_factor"], report["vae"]["scaling_factor"] = calibrate_latent_scale(
            pipe.vae, images[:4096], device=device
        )
    else:
        pipe = load_pipeline(init_from).to(device)
        report["vae"] = {"from": str(init_from)}
    pipe.vae.requires_grad_(False)
    # VAE check: reconstructions should keep shapes and colours (adherence ~ the originals')
    val_images, val_captions, _ = render_dataset(256, seed + 1000, p_second=r["p_second"], workers=1, progress=False)
    backend = SD3Backend(pipe, {**PEC_DEFAULTS, **(defaults or {})})
    with torch.no_grad():
        x = _to_float(val_images, device)
        recon = backend.decode(backend.encode_images(x)).cpu()
    report["vae"]["adherence_original"] = float(adherence_reward(x.cpu(), val_captions).mean())
    report["vae"]["adherence_recon"] = float(adherence_reward(recon, val_captions).mean())
    report["vae"]["psnr"] = float(-10 * torch.log10(F.mse_loss(recon, x.cpu())))
    if progress:
        tqdm.write(
            "vae check: adherence {adherence_recon:.3f} on reconstructions vs "
            "{adherence_original:.3f} on originals, PSNR {psnr:.1f} dB".format(**report["vae"])
        )
    lap("vae")

    latents = encode_latents(backend, images, progress=progress)
    report["latent_std"] = float(latents.std())
    lap("latents")

    flow_keys = (
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup",
        "ema_decay",
        "caption_dropout",
        "logit_mean",
        "logit_std",
    )
    report["flow"] = train_flow(
        backend, latents, captions, **{k: r[k] for k in flow_keys}, seed=seed + 2, progress=progress
    )
    lap("flow")

    pipe.to("cpu", save_dtype)
    save_pipeline(pipe, out_dir, {**PEC_DEFAULTS, **(defaults or {}), "pretrain": r})
    lap("save")
    report["time_s"]["total"] = round(sum(report["time_s"].values()), 1)
    return report
