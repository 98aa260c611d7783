"""Tissue masks on low-resolution thumbnails and the patch grid over them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import color, filters, morphology


def _otsu_or_floor(values: np.ndarray, floor: float) -> float:
    """Otsu's threshold, never below ``floor`` (an empty glass slide has no bimodality)."""
    if values.size == 0 or float(values.max()) - float(values.min()) < 1e-6:
        return max(floor, float(values.max()) if values.size else floor)
    return max(float(filters.threshold_otsu(values)), floor)


def _clean(mask: np.ndarray, min_object_px: int, close_radius: int) -> np.ndarray:
    """Morphological closing, then small objects and small holes removed."""
    if close_radius > 0:
        mask = morphology.closing(mask, morphology.disk(close_radius))
    if min_object_px > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_object_px)
        mask = morphology.remove_small_holes(mask, max_size=min_object_px)
    return mask


def tissue_mask_he(
    thumb: np.ndarray, min_saturation: float = 0.07, min_object_px: int = 16, close_radius: int = 2
) -> np.ndarray:
    """Tissue mask of an H&E thumbnail (h, w, 3) uint8.

    HSV saturation, median-blurred, Otsu-thresholded (with a floor so empty
    glass stays empty), closed, small objects and holes removed — the
    CLAM / slideflow recipe. Near-black pixels (pen, scanner borders) are excluded.
    """
    rgb = thumb[..., :3]
    hsv = color.rgb2hsv(rgb)
    sat = filters.median((hsv[..., 1] * 255).astype(np.uint8), morphology.disk(2)).astype(np.float32) / 255
    thr = _otsu_or_floor(sat.ravel(), min_saturation)
    mask = (sat > thr) & (hsv[..., 2] > 0.15)
    return _clean(mask, min_object_px, close_radius)


def tissue_mask_af(
    thumb: np.ndarray, min_ratio: float = 1.5, min_object_px: int = 16, close_radius: int = 2,
    full_scale: float | None = None, channels: int | None = None,
) -> np.ndarray:
    """Tissue mask of an AF thumbnail (h, w, C): total intensity above background.

    ``thumb`` may also be the channel sum (h, w, 1) with ``channels`` given.
    Glass has little autofluorescence; tissue is brighter. With contrast in the
    view (98th percentile >= ``min_ratio`` x 2nd percentile) the threshold is
    Otsu on log intensity, at least ``min_ratio`` x background. A view without
    contrast is all tissue or all glass: it is tissue when its mean channel
    intensity exceeds 1 % of ``full_scale`` (the dtype's range for integer AF).
    """
    total = thumb.astype(np.float32).sum(axis=2)
    total = filters.median(total, morphology.disk(2)) if total.size > 25 else total
    background = max(float(np.percentile(total, 2)), 1e-6)
    foreground = float(np.percentile(total, 98))
    if foreground < background * min_ratio:
        if full_scale is None:
            full_scale = float(np.iinfo(thumb.dtype).max) if np.issubdtype(thumb.dtype, np.integer) else 0.0
        level = float(total.mean()) / max(channels or thumb.shape[2], 1)
        return np.full(total.shape, level > 0.01 * full_scale, bool)
    log_total = np.log(np.maximum(total, 1e-6))
    thr = _otsu_or_floor(log_total.ravel(), float(np.log(background * min_ratio)))
    return _clean(log_total > thr, min_object_px, close_radius)


@dataclass(frozen=True)
class Patch:
    """A patch position in level-0 pixels and its tissue fraction."""

    x: int
    y: int
    tissue_fraction: float


def patch_grid(
    mask: np.ndarray,
    downsample: float,
    width: int,
    height: int,
    size: int,
    stride: int,
    min_tissue: float,
) -> list[Patch]:
    """Patches of ``size`` at ``stride`` over a level-0 slide of ``width`` x ``height``
    whose tissue fraction (area of the mask under the patch) is >= ``min_tissue``.

    The fraction is read off an integral image of the thumbnail mask with
    fractional (area-weighted) patch borders, so it is exact for block masks.
    """
    if width < size or height < size:
        return []
    m = mask.astype(np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)

    def area(y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """Mask area in thumbnail pixels over fractional rectangles (bilinear integral)."""

        def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            yy = np.clip(yy, 0, m.shape[0])
            xx = np.clip(xx, 0, m.shape[1])
            iy, ix = np.floor(yy).astype(int), np.floor(xx).astype(int)
            iy1, ix1 = np.minimum(iy + 1, m.shape[0]), np.minimum(ix + 1, m.shape[1])
            fy, fx = yy - iy, xx - ix
            return (
                integral[iy, ix] * (1 - fy) * (1 - fx)
                + integral[iy1, ix] * fy * (1 - fx)
                + integral[iy, ix1] * (1 - fy) * fx
                + integral[iy1, ix1] * fy * fx
            )

        return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)

    ys = np.arange(0, height - size + 1, stride)
    xs = np.arange(0, width - size + 1, stride)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = gy / downsample, gx / downsample
    y1, x1 = (gy + size) / downsample, (gx + size) / downsample
    frac = area(y0, x0, y1, x1) / np.maximum((y1 - y0) * (x1 - x0), 1e-12)
    keep = frac >= min_tissue - 1e-9
    return [
        Patch(int(x), int(y), float(min(1.0, max(0.0, f))))
        for y, x, f in zip(gy[keep], gx[keep], frac[keep])
    ]
