"""A registration as a coordinate map, and reading an H&E region through it.

A ``Transform`` maps AF level-0 pixel centres (x, y) to H&E level-0 pixels:
``T(p) = A [p, 1] + d(p)``, an affine ``A`` (2 x 3) plus a smooth residual
displacement ``d`` given on a regular grid of AF positions and interpolated
with cubic B-splines (scipy.ndimage.map_coordinates, order 3). ``tile`` reads
the H&E of an AF region through it; ``synth --misregister`` uses the inverse to
move phantom H&E content by a known transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

GLASS_RGB = 245  # fill where no H&E maps (bright glass)


@dataclass(frozen=True)
class Transform:
    """AF level-0 (x, y) -> H&E level-0 (x, y): affine plus a grid of residual shifts.

    ``dx``/``dy`` (ny, nx) are displacements in H&E pixels at the AF positions
    ``(origin[0] + i * step, origin[1] + j * step)``; outside the grid the edge
    values continue.
    """

    affine: np.ndarray  # (2, 3)
    origin: tuple[float, float] = (0.0, 0.0)
    step: float = 1.0
    dx: np.ndarray | None = None
    dy: np.ndarray | None = None

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, np.float64)
        if a.shape != (2, 3) or not np.all(np.isfinite(a)):
            raise ValueError(f"affine must be a finite 2x3 matrix, got shape {a.shape}")
        if abs(np.linalg.det(a[:, :2])) < 1e-6:
            raise ValueError("affine is singular")
        object.__setattr__(self, "affine", a)
        if (self.dx is None) != (self.dy is None):
            raise ValueError("dx and dy must be given together")
        if self.dx is not None:
            dx, dy = np.asarray(self.dx, np.float64), np.asarray(self.dy, np.float64)
            if dx.ndim != 2 or dx.shape != dy.shape or not (np.all(np.isfinite(dx)) and np.all(np.isfinite(dy))):
                raise ValueError("dx and dy must be finite 2-D grids of the same shape")
            if self.step <= 0:
                raise ValueError("grid step must be positive")
            object.__setattr__(self, "dx", dx)
            object.__setattr__(self, "dy", dy)

    @classmethod
    def identity(cls) -> "Transform":
        return cls(np.array([[1.0, 0, 0], [0, 1.0, 0]]))

    def affine_map(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = self.affine
        return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]

    def displacement(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The interpolated residual shift (H&E pixels) at AF positions."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.dx is None:
            return np.zeros_like(x), np.zeros_like(y)
        gi = (y - self.origin[1]) / self.step
        gj = (x - self.origin[0]) / self.step
        coords = np.stack([gi.ravel(), gj.ravel()])
        ddx = map_coordinates(self.dx, coords, order=3, mode="nearest").reshape(x.shape)
        ddy = map_coordinates(self.dy, coords, order=3, mode="nearest").reshape(x.shape)
        return ddx, ddy

    def map(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """H&E positions of AF positions."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        u, v = self.affine_map(x, y)
        ddx, ddy = self.displacement(x, y)
        return u + ddx, v + ddy

    def inverse_map(self, u: np.ndarray, v: np.ndarray, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """AF positions of H&E positions (fixed-point iteration; the residual field is smooth and small)."""
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        inv = np.linalg.inv(self.affine[:, :2])
        t = self.affine[:, 2]

        def solve(uu: np.ndarray, vv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return inv[0, 0] * (uu - t[0]) + inv[0, 1] * (vv - t[1]), inv[1, 0] * (uu - t[0]) + inv[1, 1] * (vv - t[1])

        x, y = solve(u, v)
        for _ in range(iterations if self.dx is not None else 0):
            ddx, ddy = self.displacement(x, y)
            x, y = solve(u - ddx, v - ddy)
        return x, y

    def max_displacement(self) -> float:
        """The largest residual shift magnitude on the grid (H&E pixels)."""
        if self.dx is None:
            return 0.0
        return float(np.sqrt(self.dx**2 + self.dy**2).max())

    def scaled(self, af_downsample: float, he_downsample: float) -> "Transform":
        """The same map between block-mean views: view pixel i covers level-0 pixels [i ds, (i + 1) ds)."""
        ca, ch = (af_downsample - 1) / 2, (he_downsample - 1) / 2  # level-0 centre of view pixel 0
        lin = self.affine[:, :2]
        t = lin @ np.array([ca, ca]) + self.affine[:, 2] - ch
        a = np.column_stack([lin * af_downsample, t]) / he_downsample
        if self.dx is None:
            return Transform(a)
        origin = ((self.origin[0] - ca) / af_downsample, (self.origin[1] - ca) / af_downsample)
        return Transform(a, origin, self.step / af_downsample, self.dx / he_downsample, self.dy / he_downsample)

    def with_affine(self, affine: np.ndarray) -> "Transform":
        return Transform(affine, self.origin, self.step, self.dx, self.dy)


def sample(image: np.ndarray, u: np.ndarray, v: np.ndarray, cval: float = GLASS_RGB, order: int = 1) -> np.ndarray:
    """Values of a channels-last ``image`` at (u, v) (x, y), ``cval`` outside; float32."""
    img = image if image.ndim == 3 else image[..., None]
    coords = np.stack([np.asarray(v, np.float64).ravel(), np.asarray(u, np.float64).ravel()])
    out = np.empty((*np.shape(u), img.shape[2]), np.float32)
    for c in range(img.shape[2]):
        out[..., c] = map_coordinates(img[..., c].astype(np.float32, copy=False), coords, order=order,
                                      mode="constant", cval=cval).reshape(np.shape(u))
    return out if image.ndim == 3 else out[..., 0]


def read_at(reader, u: np.ndarray, v: np.ndarray, cval: float = GLASS_RGB) -> np.ndarray:
    """Bilinear samples of a slide's level 0 at level-0 positions (u, v); (h, w, C) float32.

    Reads only the bounding box of the positions (plus one pixel) that lies
    inside the slide; positions outside the slide get ``cval``.
    """
    u0 = max(int(np.floor(np.min(u))) - 1, 0)
    v0 = max(int(np.floor(np.min(v))) - 1, 0)
    u1 = min(int(np.ceil(np.max(u))) + 2, reader.width)
    v1 = min(int(np.ceil(np.max(v))) + 2, reader.height)
    if u1 <= u0 or v1 <= v0:
        return np.full((*np.shape(u), reader.channels), cval, np.float32)
    window = reader.read_region(u0, v0, u1 - u0, v1 - v0)
    return sample(window, np.asarray(u) - u0, np.asarray(v) - v0, cval)


def read_registered(reader, transform: Transform | None, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The H&E of the AF region (x, y, w, h) through ``transform``: (h, w, 3) uint8.

    Without a transform this is a plain region read. With one, the H&E window
    the region maps to (enlarged by the residual shifts) is read and resampled
    bilinearly; pixels that map outside the H&E are glass.
    """
    if transform is None:
        return reader.read_region(x, y, w, h)[..., :3]
    yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float64)
    u, v = transform.map(xx, yy)
    out = read_at(reader, u, v)[..., :3]
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def warp_view(view: np.ndarray, transform: Transform, shape: tuple[int, int], cval: float = GLASS_RGB) -> np.ndarray:
    """A whole low-resolution view resampled onto a target grid of ``shape`` (h, w) through ``transform``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    u, v = transform.map(xx, yy)
    return sample(view, u, v, cval)


def transform_to_dict(t: Transform) -> dict:
    """JSON-ready form: ``affine`` rows and, if any, ``grid`` {origin, step, dx, dy} (H&E px at AF nodes)."""
    d: dict = {"affine": [[round(float(v), 8) for v in row] for row in t.affine]}
    if t.dx is not None:
        d["grid"] = {"origin": [float(t.origin[0]), float(t.origin[1])], "step": float(t.step),
                     "dx": np.round(t.dx, 4).tolist(), "dy": np.round(t.dy, 4).tolist()}
    return d


def transform_from_dict(d: dict) -> Transform:
    """Inverse of ``transform_to_dict``; ValueError/TypeError/KeyError on a malformed record."""
    grid = d.get("grid")
    if grid is None:
        return Transform(np.asarray(d["affine"], np.float64))
    return Transform(np.asarray(d["affine"], np.float64), (float(grid["origin"][0]), float(grid["origin"][1])),
                     float(grid["step"]), np.asarray(grid["dx"], np.float64), np.asarray(grid["dy"], np.float64))
