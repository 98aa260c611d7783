"""``synth --misregister``: move phantom H&E against its AF by a known, recorded transform.

A post-processing step of the written H&E: the co-registered H&E is resampled
through the inverse of a random transform ``T`` (rotation about the slide
centre, anisotropic scale, shift, plus a smooth local warp) so that AF pixel p
shows the tissue that the new H&E shows at ``T(p)``, as after a section stretched,
rotated and shifted during staining and scanning. The new H&E is larger than
the AF by the same margin on every side, enough for the whole moved AF frame
(``fit_canvas``): like a scanner's scan area, it holds all of the section, so
no tissue is lost off the slide (glass where nothing maps). ``T`` is written
beside the slide as
``<id>.he.truth.json`` in the registration format (and into the H&E's
provenance), so registration error can be measured against it.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy.ndimage import map_coordinates

from vstain_cli import seeding
from vstain_cli.data.warp import GLASS_RGB, Transform, read_at, transform_to_dict
from vstain_cli.errors import InputError
from vstain_cli.io.slides import TiffSlide
from vstain_cli.io.tiff import read_provenance, write_pyramid
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import record, write_json
from vstain_cli.seeding import derive_seed

MISREGISTER = 0x6D6973  # seeding stream: (seed, MISREGISTER, slide index)
TRUTH_SUFFIX = ".he.truth.json"
TRUTH_FORMAT = "vstain-registration"
STRIP = 256
WARP_GRID_UM = 32.0  # node spacing of the recorded warp field
CANVAS_PAD_UM = 32.0  # glass around the moved AF frame on the H&E canvas


@dataclass(frozen=True)
class Misregistration:
    """Maxima of the random transform (each slide draws its own within them)."""

    rotation_deg: float = 5.0
    shift_um: float = 200.0
    scale: float = 0.03  # per-axis scale in 1 +- scale
    warp_um: float = 20.0  # largest local displacement
    warp_wavelength_um: float = 1000.0  # shortest wavelength of the warp

    def check(self) -> None:
        if not (0 <= self.rotation_deg <= 45 and self.shift_um >= 0 and 0 <= self.scale < 0.5
                and self.warp_um >= 0 and self.warp_wavelength_um > 0):
            raise InputError("misregistration out of range (rotation 0-45 deg, scale < 0.5, shifts >= 0)")


def random_transform(width: int, height: int, mpp: float, m: Misregistration, seed: int) -> tuple[Transform, dict]:
    """A random AF -> H&E transform within ``m`` and the drawn parameters."""
    rng = seeding.numpy_rng(seed)
    sign = rng.choice([-1.0, 1.0])
    theta = np.deg2rad(sign * rng.uniform(0.5, 1.0) * m.rotation_deg)
    phi = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.5, 1.0) * m.shift_um / mpp * np.array([np.cos(phi), np.sin(phi)])
    sx, sy = 1.0 + rng.uniform(-m.scale, m.scale, 2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lin = rot @ np.diag([sx, sy])
    c = np.array([(width - 1) / 2, (height - 1) / 2])
    affine = np.column_stack([lin, c - lin @ c + shift])
    # smooth warp: a few random plane waves per axis, wavelengths 1-2x the shortest, scaled to warp_um at most
    step = WARP_GRID_UM / mpp
    nx, ny = int(np.ceil(width / step)) + 1, int(np.ceil(height / step)) + 1
    gy, gx = np.mgrid[0:ny, 0:nx] * step
    field = []
    for _ in range(2):
        f = np.zeros_like(gx)
        for _ in range(4):
            lam = rng.uniform(1.0, 2.0) * m.warp_wavelength_um / mpp
            a = rng.uniform(0, 2 * np.pi)
            f += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (np.cos(a) * gx + np.sin(a) * gy) / lam
                                                 + rng.uniform(0, 2 * np.pi))
        field.append(f)
    mag = np.sqrt(field[0] ** 2 + field[1] ** 2).max()
    k = m.warp_um / mpp / mag if mag > 0 else 0.0
    t = Transform(affine, (0.0, 0.0), step, field[0] * k, field[1] * k)
    params = {"rotation_deg": float(np.rad2deg(theta)), "shift_um": (shift * mpp).round(3).tolist(),
              "scale": [float(sx), float(sy)], "warp_um_max": float(t.max_displacement() * mpp),
              "centre_px": c.tolist(), "limits": asdict(m)}
    return t, params


def fit_canvas(t: Transform, width: int, height: int, pad_px: float) -> tuple[Transform, int]:
    """``t`` moved onto an H&E canvas ``margin`` px larger than the AF on every side; (transform, margin).

    The margin holds the whole moved AF frame: the affine image of its corners
    (an affine maps the frame inside their hull) plus the largest warp shift,
    plus ``pad_px`` of glass.
    """
    cx = np.array([0.0, width - 1, 0.0, width - 1])
    cy = np.array([0.0, 0.0, height - 1, height - 1])
    u, v = t.affine_map(cx, cy)
    over = max(0.0, -u.min(), u.max() - (width - 1), -v.min(), v.max() - (height - 1))
    margin = int(np.ceil(over + t.max_displacement() + pad_px))
    a = t.affine.copy()
    a[:, 2] += margin
    return t.with_affine(a), margin


def _inverse_rows(t: Transform, y0: int, rows: int, width: int, node: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``t.inverse_map`` over rows y0..y0+rows, solved every ``node`` px and interpolated bilinearly.

    The inverse of an affine plus a warp of millimetre wavelength is smooth:
    the interpolation error is far below 0.01 px.
    """
    ny, nx = -(-rows // node) + 1, -(-width // node) + 1
    gv, gu = np.mgrid[0:ny, 0:nx].astype(np.float64) * node
    gx, gy = t.inverse_map(gu, gv + y0)
    vv, uu = np.mgrid[0:rows, 0:width].astype(np.float64) / node
    coords = np.stack([vv.ravel(), uu.ravel()])
    x = map_coordinates(gx, coords, order=1).reshape(rows, width)
    y = map_coordinates(gy, coords, order=1).reshape(rows, width)
    return x, y


def _strips(src: TiffSlide, t: Transform, height: int, width: int, progress: Progress,
            key: str) -> Iterator[np.ndarray]:
    for y0 in range(0, height, STRIP):
        rows = min(STRIP, height - y0)
        x, y = _inverse_rows(t, y0, rows, width)  # the unmoved (AF-grid) position each new H&E pixel shows
        he = read_at(src, x, y, cval=GLASS_RGB)
        progress.advance(key, rows)
        yield (np.clip(he, 0, 255) + 0.5).astype(np.uint8)


def misregister_slide(he_path: Path, t: Transform, params: dict, slide_id: str, mpp: float,
                      progress: Progress | None = None) -> Path:
    """Rewrite the co-registered H&E at ``he_path`` moved by ``t`` onto a canvas that holds all of it
    (``fit_canvas``); write the truth JSON (``t`` on that canvas) beside it."""
    progress = progress or NullProgress()
    he_path = Path(he_path)
    # the moved slide is written under a temporary name and renamed onto he_path when complete
    # (write_pyramid), so the original is read until then and kept whole if anything fails
    with TiffSlide(he_path) as src:
        t, margin = fit_canvas(t, src.width, src.height, CANVAS_PAD_UM / mpp)
        params = {**params, "canvas_margin_px": margin}
        af_size = [src.width, src.height]
        size = [src.width + 2 * margin, src.height + 2 * margin]
        meta = read_provenance(he_path)
        meta["misregister"] = params
        key = f"misregister-{slide_id}"
        progress.start(key, f"misregister {slide_id}", size[1])
        write_pyramid(he_path, _strips(src, t, size[1], size[0], progress, key), size[1], size[0], 3, np.uint8,
                      mpp=mpp, compression="jpeg", quality=90, metadata=meta)
        progress.finish(key)
    truth = he_path.with_name(he_path.name.removesuffix(".he.tif") + TRUTH_SUFFIX)
    write_json(truth, {"format": TRUTH_FORMAT, "format_version": 1, "slide_id": slide_id, "truth": True,
                       "mpp": mpp, "af_size": af_size, "he_size": size, "transform": transform_to_dict(t),
                       "misregister": params, **record({"misregister": params})})
    return truth


def misregister_pairs(pairs_csv: str | Path, m: Misregistration | None = None, seed: int = 0, mpp: float = 0.5,
                      progress: Progress | None = None) -> list[Path]:
    """Misregister every H&E of a phantom ``pairs.csv`` (slide i draws from (seed, MISREGISTER, i))."""
    m = m or Misregistration()
    m.check()
    pairs_csv = Path(pairs_csv)
    with open(pairs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows):
        he = pairs_csv.parent / row["he"]
        with TiffSlide(he) as s:
            width, height = s.width, s.height
        t, params = random_transform(width, height, mpp, m, derive_seed(seed, MISREGISTER, i))
        out.append(misregister_slide(he, t, params, row["slide_id"], mpp, progress))
    return out
