"""PNG previews (the stain thumbnail, the uncertainty overlay) are at most 2048 px on the long side."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from vstain_cli.infer.wholeslide import MAX_THUMBNAIL, fit_within, write_thumbnail_png
from vstain_cli.uq.heatmap import write_overlay_png


def _halves(h: int, w: int) -> np.ndarray:
    """An RGB image whose left half is 100 and right half 200 (long side ``max(h, w)``)."""
    a = np.full((h, w, 3), 100, np.uint8)
    if w >= h:
        a[:, w // 2:] = 200
    else:
        a[h // 2:] = 200
    return a


def test_fit_within_is_an_area_mean():
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert fit_within(a, 2).tolist() == [[2, 4], [10, 12]]  # means of 2x2 blocks, rounded half to even
    f = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    out = fit_within(f, 2)
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == pytest.approx(f[:2, :2].mean(axis=(0, 1)).tolist())
    assert fit_within(f, 8) is f  # fits already: unchanged
    assert fit_within(np.zeros((10, 3000, 1), np.float32), 2048, 2048).shape == (7, 2048, 1)


def test_thumbnail_long_side(tmp_path):
    # a pyramid whose level 1 (ds 2) leaves the block-mean view at 1250 px for max_size 1024
    a = _halves(200, 5000)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(a, photometric="rgb", tile=(256, 256), subifds=1)
        tw.write(a[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1)
    png = np.asarray(Image.open(write_thumbnail_png(tmp_path / "p.tif", tmp_path / "p.png")))
    assert max(png.shape[:2]) == 1024
    assert png[:, :500].mean() == pytest.approx(100, abs=1) and png[:, -500:].mean() == pytest.approx(200, abs=1)
    # even when asked for more, never above MAX_THUMBNAIL (2048)
    tifffile.imwrite(tmp_path / "big.tif", _halves(300, 2600), photometric="rgb", tile=(256, 256))
    png = np.asarray(Image.open(write_thumbnail_png(tmp_path / "big.tif", tmp_path / "big.png", max_size=4096)))
    assert MAX_THUMBNAIL == 2048 and 1024 < max(png.shape[:2]) <= 2048  # not the full 2600
    assert png.mean() == pytest.approx(150, abs=1)  # an area mean keeps the average colour


@pytest.mark.parametrize("shape", [(300, 2600), (2600, 300), (2040, 300)])  # 2040 + the bar's rows > 2048
def test_uncertainty_overlay_long_side(tmp_path, shape):
    h, w = shape
    tifffile.imwrite(tmp_path / "mean.tif", _halves(h, w), photometric="rgb", tile=(256, 256))
    tifffile.imwrite(tmp_path / "width.tif", np.full((h, w), 20.0, np.float32), tile=(256, 256))
    mask = SimpleNamespace(mask=np.ones((max(1, h // 32), max(1, w // 32)), bool))
    for max_size, limit in ((1024, 1024 + 46), (4096, MAX_THUMBNAIL)):  # 46: the colour bar's rows
        out = write_overlay_png(tmp_path / "mean.tif", tmp_path / "width.tif", mask, tmp_path / f"o{max_size}.png",
                                vmax=50.0, max_size=max_size)
        width, height = Image.open(out).size
        assert 500 < max(width, height) <= limit
