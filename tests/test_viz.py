"""Image helpers shared by reports and sample grids (vstain_cli.io.images)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from vstain_cli.io import images as viz


def test_spread_channels():
    assert viz.spread_channels(26) == (25, 12, 0)
    assert viz.spread_channels(1) == (0, 0, 0)
    assert viz.spread_channels(4) == (3, 1, 0)


def test_af_false_colour_spread_maps_range_and_channels():
    af = np.full((26, 5, 6), -1.0, np.float32)
    af[25] = 1.0  # red
    af[12] = 0.0  # green half
    rgb = viz.af_false_colour(af, method="spread")
    assert rgb.shape == (3, 5, 6) and rgb.dtype == np.uint8
    assert (rgb[0] == 255).all() and (rgb[1] == 128).all() and (rgb[2] == 0).all()
    batch = viz.af_false_colour(np.stack([af, -af]), method="spread")
    assert batch.shape == (2, 3, 5, 6)
    assert (batch[1, 0] == 0).all()
    with pytest.raises(ValueError):
        viz.af_false_colour(af, method="spread", channels=(26, 0, 0))


def test_af_false_colour_pca_uses_contrast():
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.1, 0.1, (1, 16, 16))
    af = np.concatenate([base * k for k in np.linspace(0.5, 1.5, 8)]).astype(np.float32)
    rgb = viz.af_false_colour(af, method="pca")
    assert rgb.shape == (3, 16, 16)
    assert rgb[0].max() - rgb[0].min() > 200  # stretched to the 1st-99th percentile
    assert viz.af_false_colour(af[:2], method="pca").shape == (3, 16, 16)  # fewer than 3 channels


def test_colormap_and_png_round_trip():
    v = np.linspace(0, 1, 20).reshape(4, 5)
    rgb = viz.colormap(v, 0.0, 1.0)
    assert rgb.shape == (3, 4, 5) and rgb.dtype == np.uint8
    assert tuple(rgb[:, 0, 0]) == (68, 1, 84) and tuple(rgb[:, -1, -1]) == (253, 231, 37)
    uri = viz.png_data_uri(rgb)
    assert uri.startswith("data:image/png;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(back, rgb.transpose(1, 2, 0))


def test_af_false_colour_bands_default():
    af = np.zeros((6, 4, 4), np.float32)
    af[:2], af[4:] = -1.0, 1.0  # short band dark (blue), long band bright (red)
    rgb = viz.af_false_colour(af)
    assert tuple(rgb[:, 0, 0]) == (255, 128, 0)
    np.testing.assert_array_equal(viz.af_false_colour(af[None])[0], rgb)


def test_sample_grid_layout():
    rng = np.random.default_rng(0)
    af, real, pred = rng.uniform(-1, 1, (2, 5, 16, 16)), rng.uniform(-1, 1, (2, 3, 16, 16)), np.zeros((2, 3, 16, 16))
    g = viz.sample_grid(af, real, pred, min_size=32)
    assert g.shape == (2 * 34 + 2, 3 * 34 + 2, 3) and g.dtype == np.uint8
    assert (g[2:34, 70:102] == 128).all()  # prediction 0 -> mid grey, zoomed x2
