"""Small numpy-only image helpers: the RGB pixel convention ([-1, 1] <-> uint8), AF false colour,
training sample grids, report images.

Shared by training (sample grids) and ``vstain score`` (report). Images are uint8
RGB in the dataset's layout (3, H, W) or (N, 3, H, W) unless a docstring says
otherwise.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from vstain_cli.provenance import atomic_output


def he_to_unit(he: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1]."""
    return he.astype(np.float32) / 127.5 - 1.0


def unit_to_he(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 RGB (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# Viridis anchors (matplotlib's colormap sampled at 9 points), interpolated linearly.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    np.float32,
)


def spread_channels(c: int) -> tuple[int, int, int]:
    """Three channel indices spread over ``c`` spectral channels, as (R, G, B).

    Red gets the last channel, green the middle one, blue the first (longest to
    shortest wavelength when channels are ordered by wavelength).
    """
    if c < 1:
        raise ValueError("need at least one channel")
    return c - 1, (c - 1) // 2, 0


def _pca_rgb(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> float (N, 3, H, W) 0-255: first 3 principal components, stretched."""
    n, c, h, w = x.shape
    pix = x.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    pix -= pix.mean(axis=0)
    k = min(3, c)
    _, _, vt = np.linalg.svd(pix[:: max(1, len(pix) // 20000)], full_matrices=False)
    proj = pix @ vt[:k].T
    proj *= np.where(proj.sum(axis=0) < 0, -1.0, 1.0)  # deterministic sign: mostly positive
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    proj = (proj - lo) / np.maximum(hi - lo, 1e-12) * 255.0
    if k < 3:
        proj = np.concatenate([proj, np.repeat(proj[:, :1], 3 - k, axis=1)], axis=1)
    return proj.reshape(n, h, w, 3).transpose(0, 3, 1, 2)


def af_false_colour(
    af: np.ndarray,
    method: str = "bands",
    channels: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Normalised AF (C, H, W) or (N, C, H, W) in [-1, 1] -> uint8 RGB (3, H, W) / (N, 3, H, W).

    ``bands`` (default): the spectral channels are split into three contiguous
    bands (short, middle, long wavelengths), averaged, and shown as blue, green and
    red. ``spread``: three single channels (``channels`` as R, G, B, default
    :func:`spread_channels`). Both keep the dataset's normalisation ([-1, 1] ->
    0-255), so tiles are comparable. ``pca``: each pixel's spectrum projected on
    the first three principal components of the image (batch), each stretched to
    its 1st-99th percentile: more contrast, colours not comparable across calls.
    """
    x = np.asarray(af, np.float32)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"AF must be (C, H, W) or (N, C, H, W), got {np.shape(af)}")
    c = x.shape[1]
    if method == "bands":
        bands = np.array_split(np.arange(c), 3) if c >= 3 else [np.arange(c)] * 3
        rgb = unit_to_he(np.stack([x[:, b].mean(axis=1) for b in reversed(bands)], axis=1))
    elif method == "spread":
        idx = list(channels or spread_channels(c))
        if any(not 0 <= i < c for i in idx):
            raise ValueError(f"channels {idx} out of range for {c} AF channels")
        rgb = unit_to_he(x[:, idx])
    elif method == "pca":
        rgb = np.clip(np.rint(_pca_rgb(x)), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown method {method!r} (bands, spread or pca)")
    return rgb[0] if single else rgb


def colormap(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scalar map (H, W) or (N, H, W) -> uint8 viridis RGB (3, H, W) / (N, 3, H, W).

    ``vmin``/``vmax`` default to the data's 1st/99th percentiles (NaN -> vmin colour).
    """
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    if vmin is None:
        vmin = float(np.percentile(finite, 1)) if finite.size else 0.0
    if vmax is None:
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    t = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    pos = t * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(_VIRIDIS) - 2)
    f = (pos - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f
    return np.moveaxis(np.rint(rgb).astype(np.uint8), -1, -3)


def to_hwc(img: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> (H, W, 3); (H, W, 3) is returned as is, (H, W) as grey RGB."""
    a = np.asarray(img)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[0] == 3 and (a.shape[-1] != 3 or a.shape[1] != 3):
        return a.transpose(1, 2, 0)
    return a


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a uint8 RGB image ((3, H, W) or (H, W, 3)) as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(to_hwc(img).astype(np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(img: np.ndarray) -> str:
    """``data:image/png;base64,...`` for embedding an image in HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def sample_grid(af: np.ndarray, real: np.ndarray, pred: np.ndarray, min_size: int = 96) -> np.ndarray:
    """(H_total, W_total, 3) uint8 image: one row per sample, three columns.

    ``af`` (N, C, S, S), ``real`` and ``pred`` (N, 3, S, S), all in [-1, 1].
    Small tiles are enlarged (nearest) to at least ``min_size`` pixels; a 2 px
    white gutter separates the tiles.
    """
    n, _, s, _ = real.shape
    zoom = max(1, -(-min_size // s))
    gut = 2
    size = s * zoom
    out = np.full((n * (size + gut) + gut, 3 * (size + gut) + gut, 3), 255, np.uint8)
    for i in range(n):
        tiles = [af_false_colour(af[i]), unit_to_he(real[i]), unit_to_he(pred[i])]
        for j, t in enumerate(tiles):
            img = t.transpose(1, 2, 0).repeat(zoom, 0).repeat(zoom, 1)
            y, x = gut + i * (size + gut), gut + j * (size + gut)
            out[y : y + size, x : x + size] = img
    return out


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
