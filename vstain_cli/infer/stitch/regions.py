"""Regions: split a slide into streaming regions (with a margin of context) and feather-blend
them into finished strips of rows, in order, with bounded memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from vstain_cli.infer.stitch.windows import _cosine_ramp

# ----------------------------------------------------------------------------- regions


@dataclass(frozen=True, eq=False)
class Region:
    """One streaming region of a slide. Boxes are (y0, y1, x0, x1), half-open, slide px.

    ``outer``: what is read and sampled (the inner box plus up to ``margin`` px of
    context, at least a window where the slide allows). ``inner``: the pixels this
    region owns (inner boxes partition the slide). ``support``: where the region's
    blend weight is > 0: the inner box grown by ``blend / 2`` towards neighbours;
    its weights ``wy`` x ``wx`` ramp (cos^2) across the ``blend``-px band centred
    on each inner edge shared with a neighbour, so neighbouring weights sum to 1.
    """

    index: int
    row: int
    col: int
    outer: tuple[int, int, int, int]
    inner: tuple[int, int, int, int]
    support: tuple[int, int, int, int]
    wy: np.ndarray
    wx: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the outer box."""
        return self.outer[1] - self.outer[0], self.outer[3] - self.outer[2]

    def weights(self) -> np.ndarray:
        """Blend weights (outer height, outer width) float32; 0 outside ``support``."""
        y0, y1, x0, x1 = self.outer
        sy0, sy1, sx0, sx1 = self.support
        w = np.zeros((y1 - y0, x1 - x0), np.float32)
        w[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = np.outer(self.wy, self.wx)
        return w


def _axis_regions(length: int, region: int, margin: int, window: int, half: int):
    """Per axis: (outer, inner, support, weight) for each region along the axis."""
    n = max(1, math.ceil(length / region))
    bounds = [(k * length) // n for k in range(n + 1)]  # balanced: sizes differ by <= 1
    ramp = _cosine_ramp(2 * half) if half > 0 else np.zeros(0)
    out = []
    for k in range(n):
        a, b = bounds[k], bounds[k + 1]
        if b - a < 2 * half:
            raise ValueError(f"regions of {b - a} px are too small for a {2 * half} px blend band; "
                             "use larger regions or a smaller margin")
        s0 = a - half if k > 0 else a
        s1 = b + half if k < n - 1 else b
        w = np.ones(s1 - s0, np.float64)
        if k > 0:
            w[:2 * half] = ramp
        if k < n - 1:
            w[len(w) - 2 * half:] = ramp[::-1]
        o0, o1 = max(0, a - margin), min(length, b + margin)
        if o1 - o0 < window <= length:  # grow the sampled box to at least one window
            grow = window - (o1 - o0)
            o0 = max(0, o0 - grow // 2)
            o1 = min(length, o0 + window)
            o0 = o1 - window
        out.append(((o0, o1), (a, b), (s0, s1), w.astype(np.float32)))
    return out


def region_plan(slide_h: int, slide_w: int, region: int = 1024, margin: int = 64,
                window: int = 128, blend: int | None = None) -> list[Region]:
    """Regions covering a slide, row-major, for streaming inference.

    The slide is cut into ``ceil(H / region) x ceil(W / region)`` inner boxes of
    balanced sizes (<= ``region``); each is sampled with ``margin`` px of context
    on every side (clipped to the slide) and blended with its neighbours over a
    ``blend``-px band centred on their shared edge (default ``2 * margin``: the
    whole overlap of the two sampled boxes, so the least-informed outer pixels
    weigh ~0). ``blend = 0`` writes inner boxes only (hard cut, context only).
    """
    if region < 1 or margin < 0 or window < 1:
        raise ValueError(f"bad region plan: region={region}, margin={margin}, window={window}")
    blend = 2 * margin if blend is None else blend
    if blend % 2 or not 0 <= blend <= 2 * margin:
        raise ValueError(f"blend must be an even number of px in [0, 2 * margin], got {blend}")
    if slide_h < 1 or slide_w < 1:
        raise ValueError(f"slide must be at least 1x1 pixels, got {slide_h}x{slide_w}")
    rows = _axis_regions(slide_h, region, margin, window, blend // 2)
    cols = _axis_regions(slide_w, region, margin, window, blend // 2)
    plan = []
    for r, (oy, iy, sy, wy) in enumerate(rows):
        for c, (ox, ix, sx, wx) in enumerate(cols):
            plan.append(Region(len(plan), r, c, (*oy, *ox), (*iy, *ix), (*sy, *sx), wy, wx))
    return plan


class RegionBlender:
    """Accumulates feather-weighted regions; yields finished strips of rows in order.

    ``add(region, pixels (outer h, outer w, C))`` must be called in plan order
    (row-major); it returns the strips ``(y0, rows (h, W, C) float32)`` that no later
    region can change. Only rows between the last emitted row and the bottom of the
    regions added so far are held: about two region rows x slide width, never the
    slide. ``strip_rows`` (optional) makes every strip but the last a multiple of
    that many rows, aligned to y = 0 (e.g. the TIFF tile height).
    """

    def __init__(self, height: int, width: int, channels: int, plan: Sequence[Region],
                 strip_rows: int | None = None) -> None:
        self.height, self.width, self.channels = height, width, channels
        self.plan = list(plan)
        self.strip_rows = strip_rows
        # Row y is final once every region whose support starts at or above y is added.
        starts = [r.support[0] for r in self.plan] + [height]
        self._final_after = np.minimum.accumulate(np.array(starts[::-1]))[::-1]
        self._next = 0          # index of the next region expected
        self._base = 0          # first slide row held in the buffers (= rows emitted)
        self._acc = np.zeros((0, width, channels), np.float32)
        self._wsum = np.zeros((0, width), np.float32)
        self.peak_rows = 0      # most rows ever held (memory check)

    @property
    def rows_emitted(self) -> int:
        """Rows of the slide already returned as strips."""
        return self._base

    def add(self, region: Region, pixels: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Blend one region (outer box, HWC); return the strips that became final."""
        if self._next >= len(self.plan) or region.index != self.plan[self._next].index:
            raise ValueError(f"regions must be added in plan order; expected region {self._next}, "
                             f"got {region.index}")
        oy0, oy1, ox0, ox1 = region.outer
        if pixels.shape != (oy1 - oy0, ox1 - ox0, self.channels):
            raise ValueError(f"region {region.index} pixels are {pixels.shape}, expected "
                             f"{(oy1 - oy0, ox1 - ox0, self.channels)}")
        sy0, sy1, sx0, sx1 = region.support
        grow = sy1 - self._base - self._acc.shape[0]
        if grow > 0:
            self._acc = np.concatenate([self._acc, np.zeros((grow, self.width, self.channels), np.float32)])
            self._wsum = np.concatenate([self._wsum, np.zeros((grow, self.width), np.float32)])
        self.peak_rows = max(self.peak_rows, self._acc.shape[0])
        w = np.outer(region.wy, region.wx)
        px = pixels[sy0 - oy0:sy1 - oy0, sx0 - ox0:sx1 - ox0].astype(np.float32, copy=False)
        self._acc[sy0 - self._base:sy1 - self._base, sx0:sx1] += px * w[..., None]
        self._wsum[sy0 - self._base:sy1 - self._base, sx0:sx1] += w
        self._next += 1
        return self._emit(int(self._final_after[self._next]))

    def close(self) -> list[tuple[int, np.ndarray]]:
        """Return the remaining rows; every region of the plan must have been added."""
        if self._next != len(self.plan):
            raise ValueError(f"{len(self.plan) - self._next} regions were never added")
        return self._emit(self.height, final=True)

    def _emit(self, final_row: int, final: bool = False) -> list[tuple[int, np.ndarray]]:
        stop = final_row
        if self.strip_rows and not final:
            stop = (final_row // self.strip_rows) * self.strip_rows
        n = stop - self._base
        if n <= 0:
            return []
        wsum = self._wsum[:n]
        if not (wsum > 0).all():
            raise RuntimeError("region plan leaves pixels without weight (bug)")
        strip = self._acc[:n] / wsum[..., None]
        y0 = self._base
        self._acc, self._wsum = self._acc[n:].copy(), self._wsum[n:].copy()
        self._base = stop
        return [(y0, strip)]


def blend_regions(plan: Sequence[Region], regions: Iterable[tuple[Region, np.ndarray]], height: int,
                  width: int, channels: int, strip_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Feather-blend ``(region, pixels (outer h, outer w, C))`` pairs, in plan order, into strips.

    Strips come top to bottom as soon as they are final, each ``(y0, rows (h, W, C)
    float32)``; each region's pixels are dropped once added, so memory stays at
    about one region row x slide width (``RegionBlender``).
    """
    blender = RegionBlender(height, width, channels, plan, strip_rows)
    for region, pixels in regions:
        done = blender.add(region, pixels)
        del pixels
        while done:
            yield done.pop(0)
    done = blender.close()
    while done:
        yield done.pop(0)
