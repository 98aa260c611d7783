"""Seams: how visible tile borders are — the mean absolute step across borders over the same
across interior lines (1.0 = invisible)."""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- seams


def _line_steps(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean |step| between consecutive lines along ``axis`` (0: rows, 1: columns)."""
    d = np.abs(np.diff(image, axis=axis))
    other = tuple(a for a in range(image.ndim) if a != axis)
    return d.mean(axis=other)


def _border_split(n_steps: int, period: int, offset: int) -> np.ndarray:
    """Boolean per step j (between lines j and j+1): is line j+1 a tile border?"""
    j = np.arange(n_steps)
    return (j + 1 - offset) % period == 0


def seam_steps(image: np.ndarray, period: int | tuple[int, int], offset: int | tuple[int, int] = 0
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per direction, (border steps, interior steps): mean |pixel step| per line.

    A row step j is the mean over columns and channels of |I[j+1] - I[j]|; it is a
    border step when row j+1 starts a tile, i.e. (j + 1 - offset) % period == 0.
    Same for columns. ``period``/``offset`` may be (rows, cols) pairs.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    py, px = (period, period) if np.isscalar(period) else period
    oy, ox = (offset, offset) if np.isscalar(offset) else offset
    out = {}
    for name, axis, p, o in (("rows", 0, py, oy), ("cols", 1, px, ox)):
        steps = _line_steps(img, axis)
        border = _border_split(len(steps), int(p), int(o))
        out[name] = (steps[border], steps[~border])
    return out


def _ratio(border: np.ndarray, interior: np.ndarray) -> float:
    if border.size == 0 or interior.size == 0:
        return float("nan")
    b, i = float(border.mean()), float(interior.mean())
    if i == 0.0:
        return 1.0 if b == 0.0 else float("inf")
    return b / i


def seam_ratio_axes(image: np.ndarray, period: int | tuple[int, int],
                    offset: int | tuple[int, int] = 0) -> tuple[float, float]:
    """(rows, cols) seam ratios: horizontal borders (row steps), vertical borders (column steps)."""
    s = seam_steps(image, period, offset)
    return _ratio(*s["rows"]), _ratio(*s["cols"])


def seam_ratio(image: np.ndarray, period: int | tuple[int, int], offset: int | tuple[int, int] = 0) -> float:
    """Seam ratio (docs/stitching.md) of an (H, W[, C]) image tiled with ``period``.

    Mean absolute pixel step across tile-border lines (rows and columns at
    ``offset + k * period``) divided by the mean absolute step across all other
    (interior) lines, rows and columns pooled line by line. 1.0: seams are
    invisible; 2.0: border steps are twice as large as typical steps. NaN when the
    image has no border (or no interior) line; 1.0 for a constant image.
    """
    s = seam_steps(image, period, offset)
    border = np.concatenate([s["rows"][0], s["cols"][0]])
    interior = np.concatenate([s["rows"][1], s["cols"][1]])
    return _ratio(border, interior)

