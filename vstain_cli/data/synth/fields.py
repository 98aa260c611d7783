"""Procedural fields for phantom liver tissue, computed strip by strip.

Everything here is a pure function of (seed, pixel coordinates), so any strip
of a slide can be rendered on its own, in any order, in any thread, and the
result does not depend on the strip height. Used by ``vstain_cli.data.synth.render``.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)


def hash_u32(*keys: np.ndarray | int) -> np.ndarray:
    """Integer hash of coordinates/seeds (lowbias32 by C. Wellons), uint32."""
    h = np.uint32(0x9E3779B9)
    with np.errstate(over="ignore"):
        for k in keys:
            k = np.asarray(k).astype(np.uint32)
            h = h ^ (k + np.uint32(0x9E3779B9) + (h << np.uint32(6)) + (h >> np.uint32(2)))
            h = h ^ (h >> np.uint32(16))
            h = h * _M1
            h = h ^ (h >> np.uint32(15))
            h = h * _M2
            h = h ^ (h >> np.uint32(16))
    return h


def hash_unit(*keys: np.ndarray | int) -> np.ndarray:
    """Hash to float32 uniform in [0, 1)."""
    return (hash_u32(*keys) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise(y0: int, rows: int, width: int, cell: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] on rows ``y0 .. y0+rows`` of a slide ``width`` wide.

    Lattice values are hashes of (ix, iy, seed), interpolated with smoothstep;
    separable: first along x on the few lattice rows needed, then along y.
    """
    px = np.arange(width, dtype=np.float32) / np.float32(cell)
    ix = px.astype(np.int64)
    fx = _smooth(px - ix)
    py = (y0 + np.arange(rows, dtype=np.float64)) / cell
    iy = py.astype(np.int64)
    fy = _smooth((py - iy).astype(np.float32))
    ly = np.arange(iy[0], iy[-1] + 2)
    lx = np.arange(0, ix[-1] + 2)
    lattice = hash_unit(lx[None, :], ly[:, None], seed)  # (ny, nx)
    a = lattice[:, ix]
    b = lattice[:, ix + 1]
    along_x = a + (b - a) * fx[None, :]  # (ny, width)
    r = iy - ly[0]
    top = along_x[r]
    bottom = along_x[r + 1]
    return top + (bottom - top) * fy[:, None]


def fbm(y0: int, rows: int, width: int, cell: float, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise octaves, normalised to roughly [0, 1]."""
    out = np.zeros((rows, width), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += np.float32(amp) * value_noise(y0, rows, width, cell / (2.0**o), seed * 7919 + o)
        total += amp
        amp *= 0.5
    out /= np.float32(total)
    return out


def jittered_points(
    y0: int, y1: int, width: int, cell: float, seed: int, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One random point per lattice cell for cells whose point may touch rows [y0, y1).

    Returns (y, x, u, v): positions and two uniform numbers per point for
    per-object randomness. Deterministic per cell, independent of strips.
    """
    cy0 = int(np.floor((y0 - margin) / cell)) - 1
    cy1 = int(np.floor((y1 + margin) / cell)) + 1
    cys = np.arange(max(cy0, 0), cy1 + 1)
    cxs = np.arange(0, int(np.ceil(width / cell)) + 1)
    gy, gx = np.meshgrid(cys, cxs, indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()
    y = (gy + hash_unit(gx, gy, seed, 1)) * cell
    x = (gx + hash_unit(gx, gy, seed, 2)) * cell
    u = hash_unit(gx, gy, seed, 3)
    v = hash_unit(gx, gy, seed, 4)
    keep = (y + margin >= y0) & (y - margin < y1) & (x < width + margin)
    return y[keep], x[keep], u[keep], v[keep]


def stamp(canvas: np.ndarray, y0: int, sprite: np.ndarray, cy: float, cx: float, mode: str = "max") -> None:
    """Draw ``sprite`` centred at slide position (cy, cx) into a strip starting at row y0."""
    sh, sw = sprite.shape
    top = int(round(cy)) - sh // 2 - y0
    left = int(round(cx)) - sw // 2
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + sh, canvas.shape[0]), min(left + sw, canvas.shape[1])
    if t1 <= t0 or l1 <= l0:
        return
    src = sprite[t0 - top : t1 - top, l0 - left : l1 - left]
    dst = canvas[t0:t1, l0:l1]
    if mode == "max":
        np.maximum(dst, src, out=dst)
    else:
        dst += src


def disc(radius: float, soft: float = 1.0, aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """An anti-aliased (elliptical) disc sprite with values in [0, 1]."""
    r = int(np.ceil(radius * max(aspect, 1.0) + soft + 1))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx * c + yy * s) / aspect
    v = -xx * s + yy * c
    d = np.sqrt(u * u + v * v)
    return np.clip((radius - d) / soft + 0.5, 0.0, 1.0).astype(np.float32)


class NoiseTable:
    """A long table of standard normal numbers; contiguous slices at random offsets.

    Drawing fresh Gaussians for 26 channels runs at ~2 Mpx/s with numpy; a slice
    of a precomputed i.i.d. table at a hash-chosen offset is a free view with the
    same marginal statistics and no correlation between channels/strips beyond
    the (rare, random) reuse of table segments.
    """

    def __init__(self, size: int = 1 << 24, seed: int = 12345):
        self.table = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)

    def draw(self, n: int, key: tuple[int, ...]) -> np.ndarray:
        """``n`` standard normals for ``key`` (deterministic)."""
        size = self.table.size
        if n > size:
            reps = int(np.ceil(n / size))
            return np.concatenate([self.draw(size, (*key, i)) for i in range(reps)])[:n]
        off = int(hash_u32(*key)) % (size - n + 1)
        return self.table[off : off + n]
