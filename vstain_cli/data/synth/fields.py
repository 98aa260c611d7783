"""Procedural fields for phantom liver tissue, computed strip by strip.

Everything here is a pure function of (seed, pixel coordinates), so any strip
of a slide can be rendered on its own, in any order, in any thread, and the
result does not depend on the strip height. Used by ``vstain_cli.data.synth.render``.
"""

from __future__ import annotations

import numpy as np

from vstain_cli import seeding

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
        self.table = seeding.numpy_rng(seed).standard_normal(size, dtype=np.float32)

    def draw(self, n: int, key: tuple[int, ...]) -> np.ndarray:
        """``n`` standard normals for ``key`` (deterministic)."""
        size = self.table.size
        if n > size:
            reps = int(np.ceil(n / size))
            return np.concatenate([self.draw(size, (*key, i)) for i in range(reps)])[:n]
        off = int(hash_u32(*key)) % (size - n + 1)
        return self.table[off : off + n]


def soft_inside(signed_px: np.ndarray) -> np.ndarray:
    """Anti-aliased indicator of ``signed_px >= 0`` (signed distance in pixels, inside positive)."""
    return np.clip(signed_px + np.float32(0.5), 0.0, 1.0)


class Worley:
    """Nearest and second-nearest jittered lattice points of every sample position.

    Cellular (Worley 1996) noise: one point per lattice cell of side ``cell`` px at
    a hash-jittered position (``jitter`` bounds it inside its cell; ``offset``
    shifts the lattice by that many cells). The 3 x 3 neighbouring cells are
    searched, which is exact for the nearest point. ``Y``, ``X`` are absolute
    pixel coordinates (broadcastable arrays), so strips agree wherever they are cut.

    Attributes (broadcast shape of Y, X): ``d1``, ``d2`` distances (px) to the
    nearest and second-nearest point, ``p1y, p1x, p2y, p2x`` their positions,
    ``i1, i2`` flat indices into the lattice (``lattice_unit``), ``id1, id2``
    global integer cell ids.
    """

    def __init__(self, Y: np.ndarray, X: np.ndarray, cell: float, seed: int,
                 jitter: tuple[float, float] = (0.0, 1.0), offset: float = 0.0):
        self.seed, self.cell = seed, float(cell)
        Y = np.asarray(Y, np.float32)
        X = np.asarray(X, np.float32)
        cy = np.floor(Y.astype(np.float64) / cell - offset).astype(np.int64)
        cx = np.floor(X.astype(np.float64) / cell - offset).astype(np.int64)
        self.ly0, self.lx0 = int(cy.min()) - 1, int(cx.min()) - 1
        ny, nx = int(cy.max()) + 2 - self.ly0, int(cx.max()) + 2 - self.lx0
        self.shape = (ny, nx)
        ly = np.arange(self.ly0, self.ly0 + ny)[:, None]
        lx = np.arange(self.lx0, self.lx0 + nx)[None, :]
        j0, j1 = jitter
        span = np.float32(j1 - j0)
        c = np.float32(cell)
        self.py = ((ly + offset + j0 + span * hash_unit(lx + 50000, ly + 50000, seed, 1)) * c).astype(np.float32)
        self.px = ((lx + offset + j0 + span * hash_unit(lx + 50000, ly + 50000, seed, 2)) * c).astype(np.float32)
        gy0, gx0 = cy - self.ly0, cx - self.lx0
        pyf, pxf = self.py.ravel(), self.px.ravel()
        shape = np.broadcast_shapes(Y.shape, X.shape)
        big = np.float32(1e30)
        d1 = np.full(shape, big, np.float32)
        d2 = np.full(shape, big, np.float32)
        i1 = np.zeros(shape, np.int64)
        i2 = np.zeros(shape, np.int64)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                idx = (gy0 + dy) * nx + (gx0 + dx)
                qy = pyf[idx] - Y
                qx = pxf[idx] - X
                d = qy * qy + qx * qx
                closer = d < d1
                second = ~closer & (d < d2)
                # the old first becomes second where a new first arrives
                np.copyto(d2, d1, where=closer)
                np.copyto(i2, i1, where=closer)
                np.copyto(d2, d, where=second)
                np.copyto(i2, idx, where=second)
                np.copyto(d1, d, where=closer)
                np.copyto(i1, idx, where=closer)
        self.i1, self.i2 = i1, i2
        self.p1y, self.p1x = pyf[i1], pxf[i1]
        self.p2y, self.p2x = pyf[i2], pxf[i2]
        self.d1, self.d2 = np.sqrt(d1), np.sqrt(d2)
        self.id1 = self._global(i1)
        self.id2 = self._global(i2)

    def _global(self, i: np.ndarray) -> np.ndarray:
        nx = self.shape[1]
        return (i // nx + self.ly0 + 50000) * 200003 + (i % nx + self.lx0 + 50000)

    def lattice_unit(self, key: int) -> np.ndarray:
        """A uniform [0, 1) number per lattice cell for ``key`` (flat: index it with ``i1``/``i2``)."""
        ny, nx = self.shape
        ly = np.arange(self.ly0, self.ly0 + ny)[:, None] + 50000
        lx = np.arange(self.lx0, self.lx0 + nx)[None, :] + 50000
        return hash_unit(lx, ly, self.seed, 100 + key).ravel()

    def edge_distance(self) -> np.ndarray:
        """Distance (px) to the bisector of the nearest two points: (d2^2 - d1^2) / (2 |p2 - p1|)."""
        sep = np.hypot(self.p2y - self.p1y, self.p2x - self.p1x)
        return (self.d2 * self.d2 - self.d1 * self.d1) / (2.0 * np.maximum(sep, np.float32(1e-3)))

    def pair_units(self, n: int) -> list[np.ndarray]:
        """``n`` uniform [0, 1) numbers (16-bit resolution) per unordered pair (nearest, second
        nearest): per cell edge. Two numbers per 32-bit hash, so one hash per pixel for two."""
        a = np.minimum(self.id1, self.id2)
        b = np.maximum(self.id1, self.id2)
        out = []
        scale = np.float32(1.0 / 65536)
        for k in range((n + 1) // 2):
            h = hash_u32(a, b, self.seed, 200 + k)
            out.append((h >> np.uint32(16)).astype(np.float32) * scale)
            out.append((h & np.uint32(0xFFFF)).astype(np.float32) * scale)
        return out[:n]


def nearest_coarse(y0: int, rows: int, width: int, cell: float, seed: int, step: int = 8,
                   jitter: tuple[float, float] = (0.0, 1.0), offset: float = 0.0) -> tuple[np.ndarray, ...]:
    """Nearest lattice point of a coarse Worley field, searched on an absolute grid every ``step`` px.

    For large cells (lobules, vessels) the nearest point is constant over wide
    areas: the search runs on pixels whose coordinates are multiples of ``step``
    (so strips agree), each pixel takes its grid sample's point, and the exact
    distance to that point is returned. Returns (d, py, px, u0, u1, u2, u3): the
    distance (px), the point, and four per-point uniform numbers.
    """
    k0 = int(np.floor(y0 / step + 0.5))
    k1 = int(np.floor((y0 + rows - 1) / step + 0.5))
    gy = (np.arange(k0, k1 + 1, dtype=np.float32) * step)[:, None]
    gx = (np.arange(0, int(np.floor((width - 1) / step + 0.5)) + 1, dtype=np.float32) * step)[None, :]
    w = Worley(gy, gx, cell, seed, jitter, offset)
    ry = np.floor((y0 + np.arange(rows)) / step + 0.5).astype(np.int64) - k0
    rx = np.floor(np.arange(width) / step + 0.5).astype(np.int64)
    i = w.i1[ry][:, rx]
    py, px = w.py.ravel()[i], w.px.ravel()[i]
    Y = (y0 + np.arange(rows, dtype=np.float32))[:, None]
    X = np.arange(width, dtype=np.float32)[None, :]
    d = np.hypot(py - Y, px - X)
    us = [w.lattice_unit(k)[i] for k in range(4)]
    return (d, py, px, *us)
