"""Diversity of image batches in a perceptual space: what the ComfyUI diversity nodes compute.

Images are ComfyUI ``IMAGE`` tensors ``[B, H, W, 3]`` float in [0, 1]; a node may receive a *list* of
such batches (from list-producing nodes), possibly of different sizes. Encoders are
:class:`comfy_pec.encoders.PerceptualEncoder` objects (or anything callable ``images -> [B, D]``);
they resize to their own input size, so images of any size are embedded as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import PECError
from .diversity import feature_variance, vendi_score
from .perceptual import perceptual_energy, perceptual_entropy

__all__ = [
    "DiversityResult",
    "ProbeResult",
    "as_image_list",
    "concat_images",
    "diversity_of",
    "embed_images",
    "probe_entropy",
    "similarity_heatmap",
]

Images = torch.Tensor | Sequence[torch.Tensor]
Encoder = Callable[[torch.Tensor], torch.Tensor]

ONE_IMAGE_NOTE = "one image: Vendi is 1 and the variances 0 by definition; score a batch of several images"


def as_image_list(images: Images) -> list[torch.Tensor]:
    """A batch ``[B, H, W, 3]`` or a list of batches → a list of ``[b, H_i, W_i, 3]`` batches (empty ones dropped)."""
    batches = [images] if torch.is_tensor(images) else list(images)
    out = []
    for batch in batches:
        if not torch.is_tensor(batch):
            raise PECError(f"images must be tensors, got {type(batch).__name__}")
        batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
        if batch.dim() != 4 or batch.shape[-1] != 3:
            raise PECError(f"images must be [B, H, W, 3] (ComfyUI IMAGE), got shape {tuple(batch.shape)}")
        if len(batch):
            out.append(batch)
    if not out:
        raise PECError("no images to score (empty batch)")
    return out


def _mixed_sizes(batches: list[torch.Tensor], then: str) -> list[str]:
    """A note when the batches differ in size ("images come in 2 sizes (64x64, 96x64): <then>")."""
    sizes = sorted({(b.shape[2], b.shape[1]) for b in batches})
    if len(sizes) == 1:
        return []
    return [f"images come in {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}): {then}"]


@torch.no_grad()
def embed_images(
    encoder: Encoder, images: Images, batch_size: int = 16, raw: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """Features ``[N, D]`` float32 on the CPU of all images, in order, ``batch_size`` at a time, and notes
    (mixed sizes). Each chunk goes through ``encoder`` at its own size (it resizes to its input).
    ``raw``: the encoder's un-normalised features (:meth:`PerceptualEncoder.features`) where it has them."""
    batches = as_image_list(images)
    embed = encoder.features if raw and hasattr(encoder, "features") else encoder
    feats = [
        embed(batch[i : i + batch_size]).float().cpu() for batch in batches for i in range(0, len(batch), batch_size)
    ]
    return torch.cat(feats), _mixed_sizes(batches, "each is embedded at the encoder's input size")


def concat_images(images: Images) -> tuple[torch.Tensor, list[str]]:
    """One ``[N, H, W, 3]`` batch; images of another size than the first are resized (bilinear,
    antialiased) to it, with a note."""
    batches = as_image_list(images)
    height, width = batches[0].shape[1:3]
    resized = [
        b
        if b.shape[1:3] == (height, width)
        else F.interpolate(b.movedim(-1, 1).float(), size=(height, width), mode="bilinear", antialias=True)
        .movedim(1, -1)
        .clamp(0, 1)
        .to(b.dtype)
        for b in batches
    ]
    notes = _mixed_sizes(batches, f"resized to {width}x{height}")
    return torch.cat([b.to(batches[0].device) for b in resized]), notes


@dataclass
class DiversityResult:
    """Diversity of N images (means over groups when scored per prompt group).

    ``vendi``: Vendi score of order q (cosine kernel); ``variance``: feature variance ``tr(Cov)`` of the
    raw (un-normalised) features, the paper's figure, in the encoder's units; ``variance_normalised``:
    ``tr(Cov)`` of the L2-normalised features, scale-free (for unit vectors it equals the mean pairwise
    cosine distance, ``1 - mean_{i≠j} cos``); ``per_group``: ``[(vendi, variance, variance_normalised)]``
    per group; ``notes``: things the user should know.
    """

    vendi: float
    variance: float
    variance_normalised: float
    q: float
    count: int
    group_size: int
    per_group: list[tuple[float, float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """A few readable lines for the node's text display."""
        groups = len(self.per_group)
        head = f"{self.count} images" + (f" in {groups} groups of {self.group_size}" if groups > 1 else "")
        lines = [
            head,
            f"Vendi (q={self.q:g}): {self.vendi:.3f}" + (" (mean over groups)" if groups > 1 else ""),
            f"feature variance tr(Cov), raw features: {self.variance:.4g}",
            f"feature variance, normalised features: {self.variance_normalised:.4f} (= mean cosine distance)",
        ]
        if groups > 1:
            lines += [
                f"  group {i}: Vendi {v:.3f}  variance {var:.4g}  normalised {var_n:.4f}"
                for i, (v, var, var_n) in enumerate(self.per_group)
            ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def diversity_of(features: torch.Tensor, q: float = 1.0, group_size: int = 0) -> DiversityResult:
    """Vendi (``comfy_pec.diversity.vendi_score``) and the feature variance of the raw and of the
    L2-normalised ``features`` ``[N, D]`` (give raw features: ``embed_images(..., raw=True)``); with
    ``group_size`` G > 0 (N a multiple of G, e.g. G seeds per prompt, the prompts one after another)
    each group is scored on its own and the figures are the group means."""
    n = features.shape[0]
    size = group_size if group_size > 0 else n
    if n % size:
        raise PECError(f"{n} images do not split into groups of {group_size}: give a group size that divides {n}")
    sets = features.reshape(n // size, size, -1)
    scores = torch.stack([vendi_score(sets, q), feature_variance(sets), feature_variance(sets, normalize=True)], 1)
    per_group = [tuple(float(v) for v in row) for row in scores]
    vendi, variance, normalised = (float(v) for v in scores.mean(0))
    notes = [ONE_IMAGE_NOTE] if size == 1 else []
    return DiversityResult(vendi, variance, normalised, q, n, size, per_group, notes)


# --------------------------------------------------------------------------------------------------
# Similarity heatmap
# --------------------------------------------------------------------------------------------------

# A dark-blue → teal → yellow ramp (perceptually ordered, readable for colour-blind viewers).
_RAMP = torch.tensor(
    [[0.15, 0.05, 0.35], [0.20, 0.35, 0.55], [0.15, 0.60, 0.55], [0.45, 0.80, 0.35], [0.99, 0.90, 0.15]]
)


def _colormap(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] ``[...]`` → RGB ``[..., 3]`` along :data:`_RAMP`."""
    pos = values.clamp(0, 1) * (len(_RAMP) - 1)
    low = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - low).unsqueeze(-1)
    return _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac


def _thumbnails(images: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, H, W, 3]`` → ``[N, side, side, 3]`` (aspect kept, letterboxed on mid-grey)."""
    n, h, w, _ = images.shape
    scale = side / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(images.movedim(-1, 1).float(), size=(th, tw), mode="bilinear", antialias=True).movedim(1, -1)
    out = torch.full((n, side, side, 3), 0.5)
    top, left = (side - th) // 2, (side - tw) // 2
    out[:, top : top + th, left : left + tw] = small.clamp(0, 1).cpu()
    return out


def _to_pil(rgb: torch.Tensor):
    from PIL import Image

    return Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().numpy())


def similarity_heatmap(features: torch.Tensor, images: torch.Tensor, max_side: int = 768) -> torch.Tensor:
    """The cosine-similarity matrix of ``features`` ``[N, D]`` as an ``IMAGE`` ``[1, S, S + bar, 3]``:
    thumbnails of ``images`` ``[N, H, W, 3]`` along the top and the left, each cell labelled with its
    value when cells are large enough to read (N <= 24 at the default size), and a colour scale on the
    right. Colours run from the batch's least similar pair (dark blue) to identical (yellow, the diagonal)."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    n = features.shape[0]
    cell = max(4, min(96, max_side // (n + 1)))
    x = F.normalize(features.float(), dim=-1)
    sim = (x @ x.T).clamp(-1, 1)
    low = min(float(sim.min()), 0.99) if n > 1 else 0.0
    colours = _colormap((sim - low) / (1.0 - low))
    side = cell * (n + 1)
    font = ImageFont.load_default(size=max(10, min(18, cell // 4)))
    label_width = int(font.getlength("-0.00")) + 8
    bar = 14 + 16 + label_width  # gap, the colour strip, its labels

    canvas = torch.ones(side, side + bar, 3)
    canvas[cell:, cell:side] = colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    thumbs = _thumbnails(images, cell)
    for i in range(n):
        start = cell * (i + 1)
        canvas[:cell, start : start + cell] = thumbs[i]
        canvas[start : start + cell, :cell] = thumbs[i]
    ramp = torch.linspace(1.0, 0.0, side - cell)  # top = identical, bottom = the least similar pair
    canvas[cell:, side + 14 : side + 30] = _colormap(ramp).unsqueeze(1)

    picture = _to_pil(canvas)
    draw = ImageDraw.Draw(picture)
    if cell >= 4 * font.size // 2 + 8:  # room for "0.00" in a cell
        for i in range(n):
            for j in range(n):
                dark = float(colours[i, j] @ torch.tensor([0.299, 0.587, 0.114])) < 0.5
                centre = (cell * (j + 1) + cell / 2, cell * (i + 1) + cell / 2)
                text = f"{float(sim[i, j]):.2f}"
                draw.text(centre, text, fill="white" if dark else "black", font=font, anchor="mm")
    for value, y in ((1.0, cell), ((1.0 + low) / 2, (cell + side) / 2), (low, side)):
        y = min(max(y, cell + font.size / 2), side - font.size / 2)
        draw.text((side + 34, y), f"{value:.2f}", fill="black", font=font, anchor="lm")
    draw.text((side + 4, cell / 2), "cosine", fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.asarray(picture).copy()).float().div(255).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# Perceptual entropy of a probed step (docs/design.md §5)
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Perceptual entropy of one step sampled K times from B states (docs/design.md §5, paper eq. S33).

    ``entropy``: Ĥ_A, the mean over all K·B draws of ``h_A = e + (d_f/2)·log(2π·std²)``; ``energy``: the
    mean residual energy ``e = ||g(x') - g(μ)||²/(2·std²)``; ``vendi``: the mean over the B states of
    the Vendi score of their K draws (how many perceptually distinct outcomes one step yields).
    """

    entropy: float
    energy: float
    vendi: float
    per_state: list[tuple[float, float, float]]  # (Ĥ_A, energy, Vendi) per state

    def report(self, step: int, sigma: float, sigma_next: float, std: float, repeats: int) -> str:
        lines = [
            f"step {step}: sigma {sigma:.4f} -> {sigma_next:.4f}, std_step {std:.4g}, {repeats} draws per state",
            f"perceptual entropy H_A: {self.entropy:.4f}",
            f"residual energy e: {self.energy:.4f}",
            f"Vendi of the draws: {self.vendi:.3f} (of {repeats})",
        ]
        if len(self.per_state) > 1:
            lines += [
                f"  state {i}: H_A {h:.4f}  e {e:.4f}  Vendi {v:.3f}" for i, (h, e, v) in enumerate(self.per_state)
            ]
        return "\n".join(lines)


def probe_entropy(feat_samples: torch.Tensor, feat_mean: torch.Tensor, std: float) -> ProbeResult:
    """Score a probed step: ``feat_samples`` ``[K, B, D]`` = g(x') of the K draws from each of B states,
    ``feat_mean`` ``[B, D]`` = g(μ) of each state's step mean, ``std`` the step's std_step."""
    k, b, d = feat_samples.shape
    flat = feat_samples.reshape(k * b, d)
    means = feat_mean.unsqueeze(0).expand(k, b, d).reshape(k * b, d)
    energy = perceptual_energy(flat, means, std).reshape(k, b)
    entropy = perceptual_entropy(flat, means, std).reshape(k, b)
    vendi = vendi_score(feat_samples.transpose(0, 1))
    per_state = [(float(h), float(e), float(v)) for h, e, v in zip(entropy.mean(0), energy.mean(0), vendi)]
    return ProbeResult(float(entropy.mean()), float(energy.mean()), float(vendi.mean()), per_state)
