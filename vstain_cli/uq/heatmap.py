"""The interval-width heat map of ``vstain uncertainty``: a viridis look-up, its readable scale top,
the heat-map strips streamed back from the float width map, and the PNG overlay on the mean stain."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vstain_cli.infer.wholeslide import MAX_THUMBNAIL, fit_within
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.slides import open_image
from vstain_cli.provenance import atomic_output

LUT_SIZE = 1024
OVERLAY_ALPHA = 0.65
STRIP_ROWS = 256  # rows per heat-map strip read back (memory: one strip)


def as_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def heatmap_lut(size: int = LUT_SIZE) -> np.ndarray:
    """(size, 3) uint8 viridis lookup table (the colours of ``viz.colormap``)."""
    from vstain_cli.io.images import colormap

    return colormap(np.linspace(0.0, 1.0, size)[None], 0.0, 1.0)[:, 0, :].T.copy()


def apply_heatmap(width: np.ndarray, vmax: float, lut: np.ndarray) -> np.ndarray:
    """Width (..., ) 0-255 units -> uint8 RGB (..., 3): colour position = width / vmax (clipped)."""
    idx = np.clip(width * ((len(lut) - 1) / vmax), 0, len(lut) - 1)
    return lut[np.rint(idx).astype(np.int32)]


def heatmap_strips(width_path: Path, height: int, width: int, vmax: float) -> Iterator[np.ndarray]:
    """Stream width.float32.tif back as heat-map strips (second pass; memory: one strip)."""
    lut = heatmap_lut()
    with open_image(width_path) as t:
        for y in range(0, height, STRIP_ROWS):
            h = min(STRIP_ROWS, height - y)
            yield apply_heatmap(t.read_region(0, y, width, h)[..., 0], vmax, lut)


def nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v (a readable heat-map top), at most 255."""
    if v <= 0:
        return 1.0
    k = np.floor(np.log10(v))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * 10 ** k >= v - 1e-9:
            return float(min(255.0, m * 10 ** k))
    return 255.0


def write_overlay_png(mean_path: Path, width_path: Path, mask: SlideMask, png_path: Path, vmax: float,
                      max_size: int = 1024) -> Path:
    """Width heat map alpha-blended over the mean-stain thumbnail (tissue only), with a colour bar.

    The image part is at most ``max_size`` px on its long side and the PNG, colour bar
    included, at most MAX_THUMBNAIL on each side: the thumbnails are area-averaged to fit.
    """
    from PIL import Image, ImageDraw

    bar_h, pad = 14, 16
    max_size = min(max_size, MAX_THUMBNAIL)
    with open_image(mean_path) as t:
        base, _ = t.thumbnail(max_size)
    with open_image(width_path) as t:
        wthumb, _ = t.thumbnail(max_size)
    fit_h = min(max_size, MAX_THUMBNAIL - bar_h - 2 * pad)  # room for the colour bar below the image
    base, wthumb = fit_within(base, fit_h, max_size), fit_within(wthumb.astype(np.float32), fit_h, max_size)
    h, w = base.shape[:2]
    ys = np.minimum((np.arange(h) * mask.mask.shape[0] / h).astype(int), mask.mask.shape[0] - 1)
    xs = np.minimum((np.arange(w) * mask.mask.shape[1] / w).astype(int), mask.mask.shape[1] - 1)
    alpha = np.float32(OVERLAY_ALPHA) * mask.mask[ys[:, None], xs[None, :]][..., None].astype(np.float32)
    img = base[..., :3].astype(np.float32)
    img += alpha * (apply_heatmap(wthumb[..., 0], vmax, heatmap_lut()) - img)  # alpha blend, in place
    canvas = np.full((h + bar_h + 2 * pad, max(w, 160), 3), 255, np.uint8)
    canvas[:h, :w] = as_u8(img)
    bar_w = canvas.shape[1] - 2 * pad
    canvas[h + 4:h + 4 + bar_h, pad:pad + bar_w] = apply_heatmap(
        np.linspace(0, vmax, bar_w)[None].repeat(bar_h, 0), vmax, heatmap_lut())
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    draw.text((pad, h + bar_h + 6), "0", fill=(0, 0, 0))
    label = f"{vmax:g} (interval width, 0-255 units)"
    draw.text((max(pad, pad + bar_w - 6 * len(label)), h + bar_h + 6), label, fill=(0, 0, 0))
    with atomic_output(png_path) as tmp:
        im.save(tmp, format="PNG")
    return png_path


