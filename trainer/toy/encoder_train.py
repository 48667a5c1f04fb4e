"""Train the toy perceptual encoder (:class:`comfy_pec.encoders.ToyEncoder`) on the shapes world.

``pec toy train-encoder`` runs :func:`train_encoder`: supervised multi-head training on rendered
scenes of every (colour, shape) pair (the encoder is a measuring instrument, not the generative
model, so it sees the held-out pairs too). Linear heads on the encoder's features predict

* the shape and colour of each object (objects ordered by palette index, so a pair's labels do
  not depend on which one the caption names first; "none" for a missing second object);
* population codes (soft one-hot over ``bins`` Gaussian bumps) of each object's centre x, y,
  size, saturation, shade and rotation phase within its symmetry period (circular; not for
  circle / ring), and of the background's brightness and tint.

Population codes, unlike a scalar regression, make the features separate positions, sizes and
rotations non-linearly, so within one prompt (fixed shape and colour) images that differ in any
free attribute are far apart in the cosine geometry Vendi uses. Augmentation with random blur
and pixel noise makes the features robust to the softness and grain of model samples.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from comfy_pec.encoders import ASSETS_DIR, TOY_ENCODER_CONFIG, ToyEncoder

from ..world.scenes import (
    BG_LUMA_RANGE,
    BG_TINT_MAX,
    COLOUR_NAMES,
    ROTATION_FREE,
    SATURATION_RANGE,
    SHADE_RANGE,
    SHAPES,
    SYMMETRY,
    Scene,
)
from .pretrain import _cosine_lr, render_dataset

DEFAULT_ENCODER_PATH = ASSETS_DIR / "toy_encoder.safetensors"

ENCODER_TRAIN_DEFAULTS = dict(
    seed=0, n_images=20_000, steps=1500, batch_size=128, lr=2e-3, weight_decay=1e-4, bins=8, p_second=0.25
)

#: per object: (name, low, high, circular); normalised to [0, 1] over [low, high].
_OBJECT_ATTRS = (
    ("cx", 0.0, 1.0, False),
    ("cy", 0.0, 1.0, False),
    ("size", 0.10, 0.33, False),
    ("saturation", *SATURATION_RANGE, False),
    ("shade", *SHADE_RANGE, False),
    ("rotation", 0.0, 1.0, True),
)
_N_CONT = 2 * len(_OBJECT_ATTRS) + 3  # two objects + background luma, tint a, tint b
_CLASS_SIZES = (len(SHAPES), len(COLOUR_NAMES), len(SHAPES) + 1, len(COLOUR_NAMES) + 1)


def scene_labels(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of ``scenes``: classes long [N, 4] (shape A, colour A, shape B, colour B; 0 = no B),
    continuous attributes in [0, 1] float [N, 15] and their mask bool [N, 15]."""
    classes, values, masks = [], [], []
    for sc in scenes:
        objs = sorted(sc.objects, key=lambda o: COLOUR_NAMES.index(o.colour))
        cls, val, msk = [], [], []
        for k in range(2):
            o = objs[k] if k < len(objs) else None
            if o is None:
                cls += [0, 0]
                val += [0.0] * len(_OBJECT_ATTRS)
                msk += [False] * len(_OBJECT_ATTRS)
                continue
            cls += [SHAPES.index(o.shape) + k, COLOUR_NAMES.index(o.colour) + k]
            for name, lo, hi, _ in _OBJECT_ATTRS:
                raw = o.rotation / SYMMETRY[o.shape] if name == "rotation" else getattr(o, name)
                val.append(min(max((raw - lo) / (hi - lo), 0.0), 1.0))
                msk.append(not (name == "rotation" and o.shape in ROTATION_FREE))
        r, g, b = sc.background
        tint_a = r - 0.5 * (g + b)
        tint_b = math.sqrt(3.0) / 2.0 * (g - b)
        val += [
            (sc.bg_luma - BG_LUMA_RANGE[0]) / (BG_LUMA_RANGE[1] - BG_LUMA_RANGE[0]),
            0.5 + tint_a / (2 * BG_TINT_MAX),
            0.5 + tint_b / (2 * BG_TINT_MAX),
        ]
        msk += [True] * 3
        classes.append(cls)
        values.append([min(max(v, 0.0), 1.0) for v in val])
        masks.append(msk)
    return torch.tensor(classes), torch.tensor(values), torch.tensor(masks)


def _circular() -> torch.Tensor:
    flags = [c for _, _, _, c in _OBJECT_ATTRS] * 2 + [False] * 3
    return torch.tensor(flags)


def population_code(values: torch.Tensor, bins: int, circular: torch.Tensor) -> torch.Tensor:
    """Soft one-hot targets [N, M, bins] of values in [0, 1] [N, M]: Gaussian bumps of width
    1/bins around bin centres (wrapping around for the ``circular`` attributes [M])."""
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    d = values[..., None] - centres
    d = torch.where(circular[None, :, None], d - torch.round(d), d)
    t = torch.exp(-0.5 * (d * bins) ** 2)
    return t / t.sum(-1, keepdim=True)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    rad = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-rad, rad + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)
    x = F.conv2d(F.pad(x, (rad, rad, 0, 0), mode="replicate"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, rad, rad), mode="replicate"), k.view(3, 1, -1, 1), groups=3)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (half the batch, one sigma in [0.3, 1.2] px) and pixel noise (std up to 0.04)."""
    b = x.shape[0]
    sigma = 0.3 + 0.9 * float(torch.rand((), generator=gen))
    half = torch.rand(b, generator=gen) < 0.5
    x = torch.where(half.view(-1, 1, 1, 1).to(x.device), _blur(x, sigma), x)
    std = 0.04 * torch.rand(b, 1, 1, 1, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    noise = torch.randn(x.shape, generator=gen) * std
    return (x + noise.to(x.device)).clamp(0.0, 1.0)


@torch.no_grad()
def encode(encoder, images_u8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Features [N, dim] of uint8 images [N, 3, H, W]."""
    dev = next(encoder.parameters()).device
    return torch.cat(
        [
            encoder(images_u8[i : i + batch_size].to(dev).float() / 255.0).cpu()
            for i in range(0, len(images_u8), batch_size)
        ]
    )


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 500,
) -> float:
    """Accuracy on ``test_x`` [M, D] / ``test_y`` [M] of a multinomial logistic-regression probe
    fitted (L-BFGS from zero, features standardised with the training statistics, L2 penalty
    ``weight_decay``) on ``train_x`` [N, D] / labels ``train_y`` [N]. Deterministic."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xa, xb = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(xa.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xa @ w + b, train_y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xb @ w + b).argmax(1) == test_y).double().mean())


def probe_report(
    encoder, seed: int = 1, n_train: int = 2000, n_test: int = 1000, workers: int = 2, progress: bool = False
) -> dict:
    """Linear-probe accuracies of shape and colour on single-object images of every pair,
    fitted on ``n_train`` images of one seed and tested on ``n_test`` images of another."""
    out = {}
    data = {}
    for part, n, s in (("train", n_train, seed * 1000 + 1), ("test", n_test, seed * 1000 + 2)):
        imgs, _, scenes = render_dataset(n, s, split="all", p_second=0.0, workers=workers, progress=progress)
        data[part] = (encode(encoder, imgs), scene_labels(scenes)[0])
    (xa, ya), (xb, yb) = data["train"], data["test"]
    out["shape_accuracy"] = linear_probe_accuracy(xa, ya[:, 0], xb, yb[:, 0])
    out["colour_accuracy"] = linear_probe_accuracy(xa, ya[:, 1], xb, yb[:, 1])
    return out


def train_encoder(
    out_path: str | Path = DEFAULT_ENCODER_PATH,
    *,
    device: str = "cpu",
    workers: int = 2,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train a :class:`ToyEncoder` from scratch, save it to ``out_path`` (+ ``.json``), and return
    a report (wall time per phase, final loss, linear-probe accuracies on fresh images).

    ``overrides`` replace entries of :data:`ENCODER_TRAIN_DEFAULTS`.
    """
    unknown = set(overrides) - set(ENCODER_TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown encoder-training settings {sorted(unknown)}")
    r = {**ENCODER_TRAIN_DEFAULTS, **overrides}
    seed, n_images, steps, batch_size, bins = (int(r[k]) for k in ("seed", "n_images", "steps", "batch_size", "bins"))
    report: dict = {"recipe": r, "time_s": {}}
    t0 = time.perf_counter()
    images, _, scenes = render_dataset(
        n_images, seed, split="all", p_second=r["p_second"], workers=workers, progress=progress
    )
    classes, values, masks = scene_labels(scenes)
    targets = population_code(values, bins, _circular())
    report["time_s"]["data"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    encoder = ToyEncoder(**TOY_ENCODER_CONFIG, normalize=False).to(device).train()
    heads = torch.nn.Linear(encoder.dim, sum(_CLASS_SIZES) + _N_CONT * bins).to(device)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, steps // 20, 0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    smooth = float("nan")
    bar = tqdm(range(steps), desc="encoder", disable=not progress)
    for _ in bar:
        idx = torch.randint(n_images, (batch_size,), generator=gen)
        x = augment(images[idx].float() / 255.0, gen).to(device)
        out = heads(encoder(x))
        logits = out[:, : sum(_CLASS_SIZES)].split(_CLASS_SIZES, 1)
        cls = classes[idx].to(device)
        loss = sum(F.cross_entropy(lg, cls[:, k]) for k, lg in enumerate(logits))
        pop = out[:, sum(_CLASS_SIZES) :].reshape(batch_size, _N_CONT, bins).log_softmax(-1)
        ce = -(targets[idx].to(device) * pop).sum(-1)  # [B, M]
        m = masks[idx].to(device).float()
        loss = loss + (ce * m).sum() / batch_size  # every head counts alike
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        smooth = loss.item() if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}")
    encoder = encoder.cpu().eval().requires_grad_(False)
    encoder.normalize = True
    report["loss"] = smooth
    report["time_s"]["train"] = round(time.perf_counter() - t0, 1)
    report["path"] = str(encoder.save_pretrained(out_path))

    t0 = time.perf_counter()
    report["probe"] = probe_report(encoder, seed=seed + 1, workers=workers)
    report["time_s"]["probe"] = round(time.perf_counter() - t0, 1)
    return report
