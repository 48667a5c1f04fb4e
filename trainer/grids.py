"""Image grids for people: rows of samples with a caption above each row, saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 14
PAD = 2


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] → ``[B, H, W, 3]`` uint8."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def image_grid(
    images: torch.Tensor,
    ncols: int,
    row_labels: Sequence[str] | None = None,
    upscale: int = 1,
) -> Image.Image:
    """Tile ``images`` ``[N, 3, H, W]`` (row-major) into a grid of ``ncols`` columns.

    ``row_labels`` (one per row) are written above their row; ``upscale`` enlarges small images with
    nearest-neighbour so 64-px samples stay crisp.
    """
    n, _, h, w = images.shape
    nrows = -(-n // ncols)
    h, w = h * upscale, w * upscale
    label_h = LABEL_HEIGHT if row_labels else 0
    grid = Image.new("RGB", (ncols * (w + PAD) + PAD, nrows * (h + PAD + label_h) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    pixels = to_uint8(images)
    for i in range(n):
        row, col = divmod(i, ncols)
        top = PAD + row * (h + PAD + label_h)
        if row_labels and col == 0:
            draw.text((PAD, top), row_labels[row], fill="black", font=font)
        tile = Image.fromarray(pixels[i]).resize((w, h), Image.NEAREST)
        grid.paste(tile, (PAD + col * (w + PAD), top + label_h))
    return grid
