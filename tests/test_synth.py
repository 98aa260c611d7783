"""Phantom slide pairs: strip-independent, realistic components, real files."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from vstain_cli.data.synth import fields
from vstain_cli.data.synth.render import PhantomRenderer, SlideSpec, emission_spectra
from vstain_cli.io.slides import open_af, open_he


def test_value_noise_does_not_depend_on_strip_boundaries():
    whole = fields.value_noise(0, 96, 200, 17.0, 5)
    parts = np.concatenate([fields.value_noise(y, 32, 200, 17.0, 5) for y in (0, 32, 64)])
    np.testing.assert_array_equal(whole, parts)
    assert 0 <= whole.min() and whole.max() <= 1 and whole.std() > 0.05


def test_render_is_independent_of_strip_height():
    spec = SlideSpec.random("x", 2, 256, 300, 4, 0.5, 9)
    r = PhantomRenderer(spec)
    a = r.render(64, 128)
    b1, b2 = r.render(64, 50), r.render(114, 78)
    np.testing.assert_array_equal(a.he, np.concatenate([b1.he, b2.he]))
    np.testing.assert_array_equal(a.af, np.concatenate([b1.af, b2.af]))


def _fat_fraction(label: int) -> float:
    spec = SlideSpec("x", label, 1024, 1024, 4, 0.5, seed=4)
    st = PhantomRenderer(spec).render(256, 512)
    tissue = st.tissue > 0.99
    white = st.he.min(axis=2) > 225  # empty droplets are white inside tissue
    return float((white & tissue).sum() / max(tissue.sum(), 1))


def test_fat_increases_with_steatosis_label():
    fractions = [_fat_fraction(lb) for lb in range(4)]
    assert fractions == sorted(fractions), fractions
    assert fractions[0] < 0.05 and fractions[3] > 0.25


def test_af_noise_is_shot_plus_read():
    spec = SlideSpec("x", 0, 512, 512, 8, 0.5, seed=2)
    st = PhantomRenderer(spec).render(0, 512)
    glass = st.tissue < 1e-3
    assert glass.sum() > 1000
    vals = st.af[glass].astype(np.float64)  # glass: constant signal + noise
    mean, var = vals.mean(axis=0), vals.var(axis=0)
    np.testing.assert_allclose(var, mean, rtol=0.25)  # Poisson-like: variance ~ mean
    # channels are independent: near-zero correlation of noise between channels
    corr = np.corrcoef((vals - mean).T)
    assert np.abs(corr[np.triu_indices(8, 1)]).max() < 0.1


def test_he_is_not_determined_by_af():
    """Chromatin and cytoplasm texture differ between slides with identical AF structure."""
    s1 = SlideSpec("x", 1, 256, 256, 4, 0.5, seed=3)
    r = PhantomRenderer(s1)
    st = r.render(0, 256)
    assert st.he.std() > 10
    spectra = emission_spectra(26)
    assert spectra.shape == (6, 26) and spectra[2].argmax() < spectra[0].argmax()  # collagen blue-shifted


def test_synth_writes_real_files(phantom_pairs):
    folder = phantom_pairs.parent
    he = folder / "phantom-000.he.tif"
    af = folder / "phantom-000.af.ome.tif"
    slide = openslide.OpenSlide(str(he))
    assert slide.level_dimensions[0] == (640, 512)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    with tifffile.TiffFile(af) as tif:
        assert tif.is_ome and tif.series[0].shape == (512, 640, 5)
    with open_af(af) as a, open_he(he) as h:
        assert a.channels == 5 and a.dtype == np.uint16 and a.mpp == pytest.approx(0.5)
        assert (h.width, h.height) == (a.width, a.height)
    assert (folder / "synth.json").exists()


def test_large_phantom_has_three_openslide_levels(tmp_path):
    from vstain_cli.data.synth.render import synth

    csv = synth(tmp_path, slides=1, size=(2048, 1100), channels=2, seed=0)
    slide = openslide.OpenSlide(str(csv.parent / "phantom-000.he.tif"))
    assert slide.level_count >= 3
