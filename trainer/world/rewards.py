"""Pixel-computed, model-free rewards for the shapes world (:mod:`trainer.world.scenes`).

Image convention: the functions take a batch of RGB images and return a float32 tensor [B].
The native form is a torch float tensor [B, 3, H, W] in [0, 1]; :func:`to_image_tensor` also
accepts uint8 (numpy or torch) [B, H, W, 3] / [B, 3, H, W], single images, and lists of those,
and converts. Any resolution works (all measures are fractions of the image side / area).

Colour analysis (shared)
------------------------
Per pixel, the opponent plane ``a = R - (G+B)/2``, ``b = sqrt(3)/2 (G - B)`` gives chroma
``|(a, b)|`` and hue ``atan2(b, a)``. Mixing a colour with a neutral grey (anti-aliasing, blur, a
grey background) scales chroma and keeps the hue exactly, so hue identifies the object colour
and chroma measures how much of the pixel it covers. Backgrounds have chroma <= 0.04 and the
palette >= 0.6, so a dead zone ``CHROMA_FLOOR`` separates them. For a named colour c the
*colour density* is ``max(chroma - CHROMA_FLOOR, 0) * exp(KAPPA (cos(hue - hue_c) - 1))``;
dividing by the object's own peak density (mean of the top few pixels) gives a soft coverage
mask in [0, 1] whose total mass is (nearly) invariant to blur and to the object's saturation.

Adherence (``adherence_reward``), in [0, 1]
-------------------------------------------
Per named object: ``colour * (SHAPE_FLOOR + (1 - SHAPE_FLOOR) * shape) * attributes``:
  * colour = presence (mass of the named colour, a smooth ramp from 10 to 40 px at 64x64)
    x vividness (a ramp of the object's peak chroma over 0.10-0.22; the palette has >= 0.39)
    x purity (share of all chromatic mass carried by the prompt's colours, /0.9, capped at 1);
  * shape: the colour's coverage mask is translated to its centroid and scaled by its radius of
    gyration into a 32x32 canonical frame and compared (Dice) with a bank of templates of every
    shape over rotations (3 deg steps) and four blur levels; per shape the best Dice d_s; the
    shape term is softmax_s(-SHAPE_GAMMA * log(1 - d_s + SHAPE_EPS)) at the named shape (a
    log-distance softmax: decisive when the best match is near-perfect) times an absolute-fit
    ramp of the named shape's Dice over ``SHAPE_FIT``. Right colour, wrong shape -> ~SHAPE_FLOOR;
  * each named size / position word multiplies by ``0.4 + 0.6 * sigmoid(...)`` of the measured
    size (equivalent circumradius from the mass) / centroid against the world's ranges.
Two objects: the mean of the two object scores, times ``0.4 + 0.6 * relation`` when a spatial
relation is named. A wrong colour gives ~0 (there is nothing of the named colour to measure).
Noisy images: when the median high-pass of the opponent channels says the image is noisy, a
3x3 binomial smoothing is blended in before the colour analysis (clean/blurred images: none).

Preference (``preference_reward``), in [0, 1]
---------------------------------------------
Prompt-independent foreground (every chromatic pixel, whatever its hue); ``objectness`` x a
weighted mean (``PREF_WEIGHTS``) of five smooth terms, each with one optimum but the background's:
  * size: log-normal bump of the foreground area around the area the prompt's shape has at
    circumradius ``PREF_RADIUS`` = 0.30 of the side (0.19 per object for pairs), std 1.0 in
    log-area below the optimum and 0.4 above;
  * centre: Gaussian (std 0.2 of the side) in the distance of the foreground centroid from the
    image centre;
  * saturation: mean HSV saturation of the (interior) foreground mapped from [0.3, 1] to
    [0, 1] -- optimum 1, a pure colour (the palette itself sits at ~0.8-0.9);
  * background: high contrast -- the larger of two Gaussians (std 0.2) in the background luma,
    around ``PREF_BG_LUMA`` = (0.12, 0.88): near-black or near-white, both optimal;
  * upright: rotation (soft-argmax over the template bank) at 0 within the symmetry period
    (triangle/star point up, square/cross axis-aligned; circle and ring always 1).
``objectness`` = ramp of the best template Dice over (0.6, 0.9) x the vividness ramp: 1 for any
clean, coloured shape, 0 for noise or blank images, so scattered colour cannot game the terms.
Optimum: one large (r ~= 0.30), centred, fully saturated, upright object on a near-black or a
near-white background -- two peaks in the space of free attributes, equally good. That is the
paper's setting (its Fig. 4: several high-reward regions): mode-seeking GRPO concentrates "a red
circle" on one of them (which one depends on the run), a diversity-preserving method can keep both
at full reward. With a single optimum every bit of kept diversity would cost reward. Without
prompts, the best-matching shape sets the target area (and a two-object image scores low: it is
not one clean shape).

Both rewards are deterministic, float32, NaN-free on blank or noise images, and batched
(64 images at 64x64: ~0.04 s each on one CPU core, after a one-off ~1-2 s template build). On
CPU they run with a single intra-op thread (``SINGLE_THREAD``), restored on return.
Unparseable prompts raise ``ValueError`` (see :func:`trainer.world.scenes.parse_prompt`).
"""

from __future__ import annotations

import math
from functools import cache, wraps

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import (
    BOTTOM_MIN,
    CENTRE_TOL,
    COLOURS,
    LARGE_RANGE,
    LEFT_MAX,
    RIGHT_MIN,
    ROTATION_FREE,
    SHAPES,
    SMALL_RANGE,
    SYMMETRY,
    TOP_MAX,
    PromptSpec,
    inside_shape,
    parse_prompt,
    shape_area,
)

# ----------------------------------------------------------------------------------------------
# Constants (tunable; documented in the module docstring)
# ----------------------------------------------------------------------------------------------

SINGLE_THREAD = True  # CPU rewards run with one intra-op thread (see _single_threaded)
DENOISE = True  # adaptive 3x3 binomial smoothing of the opponent channels (noisy images only)
NOISE_FULL = 0.01  # median |high-pass| at which the smoothing is fully applied
CHROMA_FLOOR = 0.08  # chroma dead zone (backgrounds <= 0.04, palette >= 0.6)
KAPPA = 1.0 / 0.30**2  # von Mises hue concentration (~17 deg std); palette hues >= 50 deg apart
PEAK_TOP = 8  # pixels (at 64x64) averaged for an object's peak colour density
MIN_PEAK = 0.1  # floor of the peak chroma used to normalise coverage (vividness gates the rest)
VIVID_CHROMA = (0.1, 0.22)  # peak-chroma ramp of the colour term (a faded object earns less)
COVERAGE_FLOOR = 0.1  # coverage dead zone (isolated noise pixels)
PRESENCE_PX = (10.0, 40.0)  # named-colour mass ramp, in pixels at 64x64
PURITY_FULL = 0.9
SHAPE_FLOOR = 0.3  # adherence credit of the right colour with a wrong shape
SHAPE_GAMMA = 3.0  # shape logits = -GAMMA * log(1 - dice + EPS)
SHAPE_EPS = 0.01
SHAPE_FIT = (0.75, 0.93)  # Dice ramp of the absolute-fit factor of the shape term
ATTR_FLOOR = 0.4

CANON_GRID = 32  # canonical mask resolution
CANON_EXTENT = 2.6  # half-width of the canonical frame, in radii of gyration
BLUR_LEVELS = (0.0, 0.1, 0.2, 0.3)  # template blur (Gaussian std) in radii of gyration
ROT_STEP = 3.0  # degrees between template rotations
UPRIGHT_TEMPERATURE = 0.01

PREF_RADIUS = 0.30
PREF_PAIR_RADIUS = 0.19
PREF_BG_LUMA = (0.12, 0.88)  # the two optimal background lumas (the world's range ends)
PREF_WEIGHTS = {"size": 0.3, "centre": 0.25, "saturation": 0.2, "background": 0.15, "upright": 0.1}
PREF_SAT_RANGE = (0.3, 1.0)  # mean HSV saturation mapped linearly to the saturation term
PREF_OBJECTNESS = (0.6, 0.9)  # best template Dice ramp: the reward is gated by "one clean shape"
PREF_SIZE_SIGMA = (1.0, 0.4)  # log-area std below / above the optimum
PREF_CENTRE_SIGMA = 0.2
PREF_BG_SIGMA = 0.2

_SQRT3_2 = math.sqrt(3.0) / 2.0
_PALETTE_HUE = {}
for _name, _rgb in COLOURS.items():
    _r, _g, _b = (v / 255.0 for v in _rgb)
    _PALETTE_HUE[_name] = math.atan2(_SQRT3_2 * (_g - _b), _r - 0.5 * (_g + _b))


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def to_image_tensor(images) -> torch.Tensor:
    """Convert images to float32 [B, 3, H, W] in [0, 1].

    Accepts torch or numpy, uint8 (0-255) or float (0-1), [B, 3, H, W] / [B, H, W, 3] /
    [3, H, W] / [H, W, 3], or a list of such single images. The channel axis is the one of size 3
    (channels-first wins when both are 3).
    """
    if isinstance(images, (list, tuple)):
        images = torch.stack([to_image_tensor(im)[0] for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unsupported image type {type(images)!r}")
    x = images
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected 3-D or 4-D images, got shape {tuple(images.shape)}")
    if x.shape[1] != 3:
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"no channel axis of size 3 in shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0).contiguous()


def _single_threaded(fn):
    """Run a CPU reward with one intra-op thread, restoring the setting afterwards.

    Every op here is small (a batch of 64x64 images); intra-op threads only add
    synchronisation, and on a busy 2-core machine they made a call ~25x slower (1 s vs 0.04 s).
    """

    @wraps(fn)
    def wrapper(images, *args, **kwargs):
        n = torch.get_num_threads()
        on_cpu = not (isinstance(images, torch.Tensor) and images.device.type != "cpu")
        if not (SINGLE_THREAD and on_cpu and n > 1):
            return fn(images, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(images, *args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapper


def _specs(prompts, batch: int) -> list[PromptSpec]:
    if isinstance(prompts, (str, PromptSpec)):
        prompts = [prompts] * batch
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} images")
    return [parse_prompt(p) for p in prompts]


# ----------------------------------------------------------------------------------------------
# Colour analysis
# ----------------------------------------------------------------------------------------------


def _opponent(x: torch.Tensor, smooth: bool = False):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    a = r - 0.5 * (g + b)
    bb = _SQRT3_2 * (g - b)
    if smooth and DENOISE:
        # adaptive: blend in a 3x3 binomial smoothing in proportion to the estimated pixel noise
        # (median absolute high-pass of the opponent channels; ~0 for clean or blurred images)
        ab = torch.stack([a, bb], 1)
        sm = _binomial3(ab)
        hp = (ab - sm).abs().flatten(1).median(1).values  # [N]
        lam = (hp / NOISE_FULL).clamp(0.0, 1.0)[:, None, None, None]
        ab = ab + lam * (sm - ab)
        a, bb = ab[:, 0], ab[:, 1]
    chroma = torch.sqrt(a * a + bb * bb + 1e-12)
    return a, bb, chroma


def _binomial3(maps: torch.Tensor) -> torch.Tensor:
    """3x3 binomial smoothing of [N, C, H, W] (replicate padding): suppresses pixel noise."""
    c = maps.shape[1]
    k = torch.tensor([0.25, 0.5, 0.25], dtype=maps.dtype, device=maps.device)
    k2 = (k[:, None] * k[None, :]).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), k2, groups=c)


def _peak(density: torch.Tensor) -> torch.Tensor:
    """An object's peak density [N]: the mean of its top few pixels."""
    n, h, w = density.shape
    k = min(max(2, round(PEAK_TOP * h * w / 4096.0)), h * w)
    return density.reshape(n, -1).topk(k, dim=1).values.mean(1)


def _peak_normalise(density: torch.Tensor, peak: torch.Tensor | None = None) -> torch.Tensor:
    """Soft coverage [N, H, W]: density / peak density, clamped to [0, 1]."""
    if peak is None:
        peak = _peak(density)
    peak = peak.clamp_min(MIN_PEAK - CHROMA_FLOOR)  # density = chroma - floor
    return (density / peak[:, None, None]).clamp(0.0, 1.0)


def _dead_zone(cov: torch.Tensor) -> torch.Tensor:
    """Drop faint coverage (noise, tints): linear ramp from COVERAGE_FLOOR to 1."""
    return ((cov - COVERAGE_FLOOR) / (1.0 - COVERAGE_FLOOR)).clamp(0.0, 1.0)


def _colour_density(x: torch.Tensor, hues: torch.Tensor):
    """Per-(image, colour) density [N, H, W] and the chromatic excess [N, H, W].

    ``x``: [N, 3, H, W] (already gathered per object), ``hues``: [N] radians.
    """
    a, bb, chroma = _opponent(x, smooth=True)
    excess = (chroma - CHROMA_FLOOR).clamp_min(0.0)
    cos_d = (a * torch.cos(hues)[:, None, None] + bb * torch.sin(hues)[:, None, None]) / chroma
    sim = torch.exp(KAPPA * (cos_d.clamp(-1.0, 1.0) - 1.0))
    return excess * sim, excess, sim


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ----------------------------------------------------------------------------------------------
# Shape matching
# ----------------------------------------------------------------------------------------------


@cache
def _gyration_ratio(shape: str) -> float:
    """Radius of gyration / circumradius of the unit shape (numerically, 1024^2 samples)."""
    t = (np.arange(1024) + 0.5) / 512.0 - 1.0
    px, py = np.meshgrid(t, t)
    m = inside_shape(shape, px, py)
    return float(np.sqrt((px[m] ** 2 + py[m] ** 2).mean()))


def _gauss_blur(maps: torch.Tensor, sigma_px: float) -> torch.Tensor:
    if sigma_px <= 0:
        return maps
    rad = math.ceil(3 * sigma_px)
    t = torch.arange(-rad, rad + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(maps, (rad, rad, 0, 0)), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, rad, rad)), k.view(1, 1, -1, 1))


class _TemplateBank:
    """Canonical masks (centroid at 0, radius of gyration 1) of every shape x rotation x blur."""

    def __init__(self):
        g, s = CANON_GRID, 4
        n = g * s
        t = (np.arange(n) + 0.5) / n * (2 * CANON_EXTENT) - CANON_EXTENT
        px, py = np.meshgrid(t, t)
        step = 2 * CANON_EXTENT / n
        maps, shape_idx, rots = [], [], []
        for si, shape in enumerate(SHAPES):
            period = SYMMETRY[shape]
            angles = [0.0] if shape in ROTATION_FREE else list(np.arange(0.0, period, ROT_STEP))
            for b in BLUR_LEVELS:
                # blur adds 2 b^2 to the squared radius of gyration: shrink the shape to compensate
                rg = math.sqrt(max(1.0 - 2.0 * b * b, 0.25))
                radius = rg / _gyration_ratio(shape)
                hi = np.stack([inside_shape(shape, px, py, 0.0, 0.0, radius, a) for a in angles])
                hi_t = torch.from_numpy(hi.astype(np.float32))[:, None]
                hi_t = _gauss_blur(hi_t, b / step)
                lo = F.avg_pool2d(hi_t, s)[:, 0]
                maps.append(lo)
                shape_idx += [si] * len(angles)
                rots += list(angles)
        self.maps = torch.cat(maps).reshape(-1, g * g)  # [T, G*G]
        self.norm2 = (self.maps**2).sum(1)
        self.shape_idx = torch.tensor(shape_idx)
        self.rotation = torch.tensor(rots, dtype=torch.float32)
        period = torch.tensor([SYMMETRY[SHAPES[i]] for i in shape_idx], dtype=torch.float32)
        free = torch.tensor([SHAPES[i] in ROTATION_FREE for i in shape_idx])
        up = torch.cos(2 * math.pi * self.rotation / period)
        self.upright = torch.where(free, torch.ones_like(up), up)  # [T] in [-1, 1]
        self.columns = [torch.nonzero(self.shape_idx == i).flatten() for i in range(len(SHAPES))]


@cache
def _bank() -> _TemplateBank:
    return _TemplateBank()


def _moments(mask: torch.Tensor):
    """Mass (fraction of the image), centroid (fractions of the side) and radius of gyration (px)."""
    _, h, w = mask.shape
    ys = torch.arange(h, dtype=torch.float32, device=mask.device)
    xs = torch.arange(w, dtype=torch.float32, device=mask.device)
    mass = mask.sum((1, 2))
    denom = mass + 1e-6
    cx = (mask.sum(1) * xs).sum(1) / denom
    cy = (mask.sum(2) * ys).sum(1) / denom
    var = (
        (mask.sum(1) * (xs[None] - cx[:, None]) ** 2).sum(1) + (mask.sum(2) * (ys[None] - cy[:, None]) ** 2).sum(1)
    ) / denom
    rg = torch.sqrt(var + 1e-6)
    return mass / (h * w), (cx + 0.5) / w, (cy + 0.5) / h, cx, cy, rg


def _canonical(mask: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, rg: torch.Tensor):
    """Resample masks [N, H, W] into the canonical frame [N, G*G] (2x2 supersampled)."""
    n, h, w = mask.shape
    g2 = CANON_GRID * 2
    t = (torch.arange(g2, dtype=torch.float32, device=mask.device) + 0.5) / g2
    t = t * (2 * CANON_EXTENT) - CANON_EXTENT
    rg = rg.clamp_min(0.75)
    xpix = cx[:, None] + t[None] * rg[:, None]  # [N, G2]
    ypix = cy[:, None] + t[None] * rg[:, None]
    gx = (2 * xpix + 1) / w - 1
    gy = (2 * ypix + 1) / h - 1
    grid = torch.stack([gx[:, None, :].expand(n, g2, g2), gy[:, :, None].expand(n, g2, g2)], -1)
    out = F.grid_sample(mask[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(out, 2).reshape(n, -1)


def _match(mask: torch.Tensor):
    """Dice of each mask against every template: [N, T], plus moments."""
    bank = _bank()
    mass, fx, fy, cx, cy, rg = _moments(mask)
    can = _canonical(mask, cx, cy, rg)
    maps = bank.maps.to(mask.device)
    dot = can @ maps.T
    dice = 2 * dot / ((can**2).sum(1, keepdim=True) + bank.norm2.to(mask.device)[None] + 1e-6)
    return dice, (mass, fx, fy)


def _shape_scores(dice: torch.Tensor) -> torch.Tensor:
    """Best Dice per shape: [N, S]."""
    bank = _bank()
    return torch.stack([dice[:, cols.to(dice.device)].max(1).values for cols in bank.columns], 1)


def _shape_logits(best: torch.Tensor) -> torch.Tensor:
    """Logits of the shape classes from the best Dice per shape (log-distance, see docstring)."""
    return -SHAPE_GAMMA * torch.log((1.0 - best).clamp_min(0.0) + SHAPE_EPS)


def _upright(dice: torch.Tensor, shape_index: torch.Tensor) -> torch.Tensor:
    """Soft-argmax uprightness in [0, 1] of each mask for its shape (1 = rotation 0)."""
    bank = _bank()
    up = bank.upright.to(dice.device)
    owner = bank.shape_idx.to(dice.device)
    logits = dice / UPRIGHT_TEMPERATURE
    logits = logits.masked_fill(owner[None] != shape_index[:, None], float("-inf"))
    wts = torch.softmax(logits, dim=1)
    return 0.5 * (1.0 + (wts * up[None]).sum(1))


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


_SIZE_CODES = {None: 0, "small": 1, "large": 2}
_POSITION_CODES = {None: 0, **{p: k + 1 for k, p in enumerate(("left", "right", "top", "bottom", "centre"))}}
_RELATION_CODES = {"and": 0, "left_of": 1, "right_of": 2, "above": 3, "below": 4}


def _size_terms(code: torch.Tensor, area: torch.Tensor, unit_area: torch.Tensor) -> torch.Tensor:
    """Named-size terms [N] (1 where no size is named); size = equivalent circumradius."""
    r = torch.sqrt(area.clamp_min(0.0) / unit_area + 1e-12)
    mid = 0.5 * (SMALL_RANGE[1] + LARGE_RANGE[0])
    small = torch.sigmoid((mid - r) / 0.01)
    table = torch.stack([torch.ones_like(r), small, 1.0 - small], 1)
    return table.gather(1, code[:, None])[:, 0]


def _position_terms(code: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Named-position terms [N] (1 where no position is named), from the centroid."""
    s = 0.02
    tol = CENTRE_TOL + 0.04
    table = torch.stack(
        [
            torch.ones_like(fx),
            torch.sigmoid((LEFT_MAX + 0.06 - fx) / s),
            torch.sigmoid((fx - (RIGHT_MIN - 0.06)) / s),
            torch.sigmoid((TOP_MAX + 0.06 - fy) / s),
            torch.sigmoid((fy - (BOTTOM_MIN - 0.06)) / s),
            torch.sigmoid((tol - (fx - 0.5).abs()) / 0.01) * torch.sigmoid((tol - (fy - 0.5).abs()) / 0.01),
        ],
        1,
    )
    return table.gather(1, code[:, None])[:, 0]


def _relation_terms(code: torch.Tensor, a: tuple, b: tuple) -> torch.Tensor:
    """Relation terms [P] of object a to object b (1 for "and")."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay

    def term(along, across):
        return torch.sigmoid((along - 0.5 * across.abs() - 0.04) / 0.02)

    table = torch.stack([torch.ones_like(dx), term(dx, dy), term(-dx, dy), term(dy, dx), term(-dy, dx)], 1)
    return table.gather(1, code[:, None])[:, 0]


@_single_threaded
def adherence_reward(images, prompts, return_terms: bool = False):
    """Prompt adherence in [0, 1] per image: float32 [B] (see the module docstring).

    ``images``: see :func:`to_image_tensor`; ``prompts``: one prompt (text or PromptSpec) or B.
    With ``return_terms`` also returns a dict of per-image diagnostic tensors [B]
    (colour, shape, attributes: means over the named objects; relation).
    """
    x = to_image_tensor(images)
    bsz = x.shape[0]
    dev = x.device
    specs = _specs(prompts, bsz)
    objs = [o for sp in specs for o in sp.objects]
    nobj = torch.tensor([len(sp.objects) for sp in specs], device=dev)
    owner_t = torch.repeat_interleave(torch.arange(bsz, device=dev), nobj)
    first = torch.cumsum(nobj, 0) - nobj  # index of each image's first object
    second = first + nobj - 1  # its last object (== first for single-object prompts)
    hue_t = torch.tensor([_PALETTE_HUE[o.colour] for o in objs], dtype=torch.float32, device=dev)
    shape_t = torch.tensor([SHAPES.index(o.shape) for o in objs], device=dev)

    density, excess, sim = _colour_density(x[owner_t], hue_t)
    peak = _peak(density)
    cov = _dead_zone(_peak_normalise(density, peak))
    vivid = _smoothstep(peak + CHROMA_FLOOR, *VIVID_CHROMA)

    # purity: share of the chromatic mass of each image carried by its prompt's colours
    sim_obj = sim * (excess > 0)
    sim_max = torch.maximum(sim_obj[first], sim_obj[second])
    exc_img = excess[first]
    purity = (exc_img * sim_max).sum((1, 2)) / (exc_img.sum((1, 2)) + 1e-6)
    purity = (purity / PURITY_FULL).clamp(0.0, 1.0)

    dice, (mass, fx, fy) = _match(cov)
    presence = _smoothstep(mass * 4096.0, *PRESENCE_PX)
    colour = presence * vivid * purity[owner_t]
    best = _shape_scores(dice)
    shape_p = torch.softmax(_shape_logits(best), 1).gather(1, shape_t[:, None])[:, 0]
    # absolute fit: a mask that matches no template well earns less even if it is "closest"
    shape_p = shape_p * _smoothstep(best.gather(1, shape_t[:, None])[:, 0], *SHAPE_FIT)

    size_code = torch.tensor([_SIZE_CODES[o.size] for o in objs], device=dev)
    pos_code = torch.tensor([_POSITION_CODES[o.position] for o in objs], device=dev)
    unit_area = torch.tensor([shape_area(o.shape) for o in objs], dtype=torch.float32, device=dev)
    attr = (ATTR_FLOOR + (1 - ATTR_FLOOR) * _size_terms(size_code, mass, unit_area)) * (
        ATTR_FLOOR + (1 - ATTR_FLOOR) * _position_terms(pos_code, fx, fy)
    )
    score = colour * (SHAPE_FLOOR + (1 - SHAPE_FLOOR) * shape_p) * attr

    def mean(v: torch.Tensor) -> torch.Tensor:  # per-image mean over the named objects
        return torch.zeros(bsz, device=dev).index_add_(0, owner_t, v) / nobj

    rel_code = torch.tensor([_RELATION_CODES.get(sp.relation or "and") for sp in specs], device=dev)
    relation = _relation_terms(rel_code, (fx[first], fy[first]), (fx[second], fy[second]))
    reward = mean(score) * (ATTR_FLOOR + (1 - ATTR_FLOOR) * relation)
    reward = reward.float().clamp(0.0, 1.0)
    if not return_terms:
        return reward
    return reward, {
        "colour": mean(colour),
        "shape": mean(shape_p),
        "attributes": mean(attr),
        "relation": relation,
        "purity": purity,
    }


@_single_threaded
def preference_reward(images, prompts=None, weights: dict | None = None, return_terms: bool = False):
    """A smooth two-peaked "preference" in [0, 1] per image: float32 [B].

    Optimum: one large (circumradius ~0.30 of the side), centred, fully saturated, upright object
    on a near-black or a near-white background (see the module docstring). ``prompts``
    (optional) only set the target area (the shape's area at the optimum radius) and which
    shape's rotation is "upright"; without them the best-matching shape is used.
    """
    x = to_image_tensor(images)
    bsz = x.shape[0]
    wts = dict(PREF_WEIGHTS)
    if weights:
        unknown = set(weights) - set(wts)
        if unknown:
            raise ValueError(f"unknown preference terms {sorted(unknown)}")
        wts.update(weights)
    specs = _specs(prompts, bsz) if prompts is not None else None

    _, _, chroma = _opponent(x, smooth=True)
    excess = (chroma - CHROMA_FLOOR).clamp_min(0.0)
    peak = _peak(excess)
    cov = _dead_zone(_peak_normalise(excess, peak))
    vivid = _smoothstep(peak + CHROMA_FLOOR, *VIVID_CHROMA)
    dice, (area, fx, fy) = _match(cov)

    if specs is None:
        shape_idx = _shape_scores(dice).argmax(1)
        target = torch.tensor([shape_area(SHAPES[int(i)]) * PREF_RADIUS**2 for i in shape_idx], device=x.device)
    else:
        shape_idx = torch.tensor([SHAPES.index(sp.shape) for sp in specs], device=x.device)
        target = torch.tensor(
            [
                shape_area(sp.shape) * PREF_RADIUS**2
                if len(sp.objects) == 1
                else sum(shape_area(o.shape) for o in sp.objects) * PREF_PAIR_RADIUS**2
                for sp in specs
            ],
            dtype=torch.float32,
            device=x.device,
        )

    logr = torch.log(area + 1e-4) - torch.log(target)
    sig = torch.where(logr < 0, torch.full_like(logr, PREF_SIZE_SIGMA[0]), torch.full_like(logr, PREF_SIZE_SIGMA[1]))
    size = torch.exp(-0.5 * (logr / sig) ** 2)

    d2 = (fx - 0.5) ** 2 + (fy - 0.5) ** 2
    centre = torch.exp(-0.5 * d2 / PREF_CENTRE_SIGMA**2)

    mx = x.max(1).values
    mn = x.min(1).values
    sat = (mx - mn) / (mx + 1e-3)
    wfg = cov * cov
    mean_sat = (sat * wfg).sum((1, 2)) / (wfg.sum((1, 2)) + 1e-3)
    saturation = ((mean_sat - PREF_SAT_RANGE[0]) / (PREF_SAT_RANGE[1] - PREF_SAT_RANGE[0])).clamp(0, 1)

    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    wbg = (1.0 - cov) * (excess <= 0).float()
    bg_luma = ((luma * wbg).sum((1, 2)) + 0.5) / (wbg.sum((1, 2)) + 1.0)
    background = (
        torch.stack([torch.exp(-0.5 * ((bg_luma - peak) / PREF_BG_SIGMA) ** 2) for peak in PREF_BG_LUMA]).max(0).values
    )

    best = _shape_scores(dice).max(1).values
    objectness = _smoothstep(best, *PREF_OBJECTNESS) * vivid
    upright = _upright(dice, shape_idx)
    pairs = [i for i, sp in enumerate(specs or []) if len(sp.objects) == 2]
    if pairs:
        # pairs: shape fit and uprightness of each named object on its own colour mask
        pobjs = [o for i in pairs for o in specs[i].objects]
        pidx = torch.tensor(pairs, device=x.device).repeat_interleave(2)
        hues = torch.tensor([_PALETTE_HUE[o.colour] for o in pobjs], device=x.device)
        dens, _, _ = _colour_density(x[pidx], hues)
        pk = _peak(dens)
        d_obj, _ = _match(_dead_zone(_peak_normalise(dens, pk)))
        sidx = torch.tensor([SHAPES.index(o.shape) for o in pobjs], device=x.device)
        fit = _smoothstep(_shape_scores(d_obj).max(1).values, *PREF_OBJECTNESS)
        fit = fit * _smoothstep(pk + CHROMA_FLOOR, *VIVID_CHROMA)
        rows = torch.tensor(pairs, device=x.device)
        upright[rows] = _upright(d_obj, sidx).reshape(-1, 2).mean(1)
        objectness[rows] = fit.reshape(-1, 2).mean(1)

    terms = {"size": size, "centre": centre, "saturation": saturation, "background": background, "upright": upright}
    total = sum(wts.values())
    reward = objectness * sum(wts[k] * terms[k] for k in wts) / total
    reward = reward.float().clamp(0.0, 1.0)
    if not return_terms:
        return reward
    terms.update({"objectness": objectness, "area": area, "cx": fx, "cy": fy, "bg_luma": bg_luma})
    return reward, terms
