"""Slide scale: a slide at another µm/px than the model's is resampled to the model's
scale on the fly and its outputs are written at the slide's own scale."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch.nn.functional as F
from test_formats import identity_run
from torch import nn

from vstain_cli.infer.stain import StainOptions, stain_slide
from vstain_cli.infer.wholeslide import training_mpp
from vstain_cli.io.resample import ResampledSlide, axis_weights, plan_scale, resample_strips
from vstain_cli.io.slides import open_af, open_image
from vstain_cli.io.tiff import read_provenance, write_pyramid
from vstain_cli.progress import NullProgress

OPTS = dict(region=192, compression="zlib", batch_size=16)  # lossless, so only resampling differs


# ----------------------------------------------------------------------------- the rule


def test_scale_rule_tolerance_override_and_warnings():
    assert plan_scale(0.5, None, 0.5).factor == 1.0
    assert plan_scale(0.54, None, 0.5).factor == 1.0 and not plan_scale(0.54, None, 0.5).resample  # within 10 %
    s = plan_scale(0.25, None, 0.5)
    assert s.resample and s.factor == 2.0 and s.out_mpp == 0.25 and s.source == "file" and not s.warnings
    assert plan_scale(0.44, None, 0.5).resample  # 12 % off
    o = plan_scale(0.5, 0.25, 0.5)  # --mpp overrides a misstated file
    assert o.factor == 2.0 and o.source == "--mpp" and o.out_mpp == 0.25
    n = plan_scale(None, None, 0.5, name="a.tif")
    assert n.factor == 1.0 and n.out_mpp == 0.5 and "a.tif records no µm/px" in n.warnings[0]
    assert "0.5 µm/px" in n.warnings[0]  # names the assumed value
    old_run = plan_scale(0.25, None, None)  # a run without a recorded scale: the slide as it is
    assert old_run.factor == 1.0 and old_run.out_mpp == 0.25 and not old_run.warnings
    with pytest.raises(ValueError, match="--mpp"):
        plan_scale(0.5, 0.0, 0.5)


def test_resampling_weights_are_area_means_and_linear_interpolation():
    s0, s1, w = axis_weights(3, 6, 2.0, 20)  # shrink 2x: pairs of source pixels
    assert (s0, s1) == (6, 12) and np.allclose(w, np.kron(np.eye(3), [0.5, 0.5]))
    _, _, w = axis_weights(0, 3, 1.5, 10)  # 1.5 source px per output px, by overlap
    assert np.allclose(w[1, 1:3], [1 / 3, 2 / 3])
    _, _, w = axis_weights(0, 4, 0.5, 2)  # enlarge 2x: linear between centres, edges clamped
    assert np.allclose(w, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    img = np.random.default_rng(0).random((50, 30, 2)).astype(np.float32)
    strips = [img[y : y + 9] for y in range(0, 50, 9)]
    whole = np.concatenate(list(resample_strips(strips, 50, 30, 100, 60, chunk=16)))
    once = np.concatenate(list(resample_strips([img], 50, 30, 100, 60, chunk=100)))
    np.testing.assert_array_equal(whole, once)  # streaming does not change a pixel


# ----------------------------------------------------------------------------- the phantom at 0.25 µm/px


@pytest.fixture(scope="module")
def slides(phantom_pairs, tmp_path_factory):
    """A phantom AF slide (0.5 µm/px) and copies: 0.25 µm/px (each pixel 2x2), the same
    without any scale metadata, and a 0.52 µm/px label on the original pixels."""
    folder = tmp_path_factory.mktemp("scale")
    row = next(csv.DictReader(open(phantom_pairs)))
    original = phantom_pairs.parent / row["af"]
    with open_af(original) as s:
        assert s.mpp == pytest.approx(0.5)
        af = s.read_region(0, 0, s.width, s.height)
    fine = af.repeat(2, axis=0).repeat(2, axis=1)
    h, w, c = fine.shape
    copy = folder / "fine.ome.tif"
    write_pyramid(copy, iter([fine]), h, w, c, np.uint16, mpp=0.25, compression="zlib", subifds=True,
                  min_level_size=512, ome_channels=[f"AF{i}" for i in range(c)])
    bare = folder / "fine-bare.tif"
    tifffile.imwrite(bare, fine, photometric="minisblack", planarconfig="contig", tile=(256, 256))
    near = folder / "near.ome.tif"
    write_pyramid(near, iter([af]), *af.shape[:2], c, np.uint16, mpp=0.52, compression="zlib", subifds=True,
                  min_level_size=512, ome_channels=[f"AF{i}" for i in range(c)])
    return {"original": original, "fine": copy, "bare": bare, "near": near, "af": af, "channels": c}


class BoxBlur(nn.Module):
    """A 'model' that looks at context: the 9x9 mean of the first three channels, so its
    picture depends on the pixel size it is given."""

    def forward(self, cond):
        return F.avg_pool2d(F.pad(cond[:, :3], (4, 4, 4, 4), mode="replicate"), 9, stride=1)


def _read(path):
    with open_image(path) as s:
        return s.read_region(0, 0, s.width, s.height).astype(np.float64), s.mpp


def _blur(img: np.ndarray) -> np.ndarray:
    """What 2x linear enlargement then a 2x2 mean does: [1/8, 3/4, 1/8] per axis, edges clamped."""
    from scipy.ndimage import convolve1d

    k = np.array([0.125, 0.75, 0.125])
    return convolve1d(convolve1d(img, k, axis=0, mode="nearest"), k, axis=1, mode="nearest")


def test_resampled_view_of_the_copy_is_the_original(slides):
    with open_af(slides["fine"]) as fine:
        view = ResampledSlide(fine, 2.0, mpp=0.5)
        assert (view.width, view.height) == (slides["af"].shape[1], slides["af"].shape[0])
        np.testing.assert_array_equal(view.read_region(0, 0, view.width, view.height), slides["af"])
        np.testing.assert_array_equal(view.read_region(101, 77, 64, 50), slides["af"][77:127, 101:165])


def test_quarter_micron_copy_stains_to_the_same_picture(slides, tmp_path):
    """The 0.25 µm/px copy is read at the model's 0.5 µm/px (2x2 means: the original's
    pixels), stained, and enlarged back 2x (linear). Its 2x2 means are the original stain
    seen through [1/8, 3/4, 1/8] (the linear enlargement's footprint), up to rounding:
    <= 0.5 for the copy's uint8 write and <= 0.5 for the original's, so <= 1 grey level.
    The model looks at 9x9 px of context, so staining the copy at its own scale would not
    give this picture (checked below with --mpp 0.5 forcing that)."""
    run = identity_run(tmp_path / "run", channels=slides["channels"], mpp=0.5, model=BoxBlur())
    a = stain_slide(slides["original"], run, tmp_path / "a.tif", StainOptions(**OPTS))
    p = NullProgress()
    b = stain_slide(slides["fine"], run, tmp_path / "b.tif", StainOptions(**OPTS), progress=p)
    got, mpp_b = _read(b.out)
    want, mpp_a = _read(a.out)
    assert (mpp_a, mpp_b) == (pytest.approx(0.5), pytest.approx(0.25)) and not p.warnings
    assert got.shape[:2] == (2 * want.shape[0], 2 * want.shape[1])  # written at the slide's own scale
    halved = got.reshape(want.shape[0], 2, want.shape[1], 2, 3).mean(axis=(1, 3))
    assert want.std() > 20  # a real picture, not blank glass
    assert np.abs(halved - _blur(want)).max() <= 1.0 + 1e-9
    assert np.abs(halved - want).mean() < 1.0  # and close to the original itself (the blur only softens)
    scale = read_provenance(b.out)["config"]["scale"]
    assert scale["resampled"] and scale["factor"] == 2.0 and scale["model_mpp"] == 0.5
    assert b.scale == scale and a.scale["resampled"] is False and a.sampling is None  # what the summary line says
    unscaled = stain_slide(slides["fine"], run, tmp_path / "c.tif", StainOptions(mpp=0.5, **OPTS))
    wrong = _read(unscaled.out)[0].reshape(want.shape[0], 2, want.shape[1], 2, 3).mean(axis=(1, 3))
    assert np.abs(wrong - _blur(want)).max() > 10  # without resampling: another picture


def test_mpp_option_stands_in_for_a_slide_without_scale(slides, tmp_path):
    run = identity_run(tmp_path / "run", channels=slides["channels"], mpp=0.5)
    p = NullProgress()
    assumed = stain_slide(slides["bare"], run, tmp_path / "assumed.tif", StainOptions(**OPTS), progress=p)
    assert any("records no µm/px; assuming the model's training scale, 0.5 µm/px" in w for w in p.warnings)
    assert _read(assumed.out)[0].shape[:2] == (1024, 1280) and _read(assumed.out)[1] == pytest.approx(0.5)
    given = stain_slide(slides["bare"], run, tmp_path / "given.tif", StainOptions(mpp=0.25, **OPTS))
    fine = stain_slide(slides["fine"], run, tmp_path / "fine.tif", StainOptions(**OPTS))
    np.testing.assert_array_equal(_read(given.out)[0], _read(fine.out)[0])
    assert _read(given.out)[1] == pytest.approx(0.25)


def test_within_ten_percent_is_used_as_it_is(slides, tmp_path):
    run = identity_run(tmp_path / "run", channels=slides["channels"], mpp=0.5)
    near = stain_slide(slides["near"], run, tmp_path / "near.tif", StainOptions(**OPTS))
    orig = stain_slide(slides["original"], run, tmp_path / "orig.tif", StainOptions(**OPTS))
    np.testing.assert_array_equal(_read(near.out)[0], _read(orig.out)[0])
    assert _read(near.out)[1] == pytest.approx(0.52)
    assert read_provenance(near.out)["config"]["scale"]["resampled"] is False


def test_training_scale_comes_from_the_run_or_its_dataset(tmp_path, slides):
    run = identity_run(tmp_path / "run", channels=slides["channels"], mpp=0.5)
    assert training_mpp(run) == 0.5
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"mpp": 0.25}))
    run.config = {"dataset": {"root": str(ds)}}  # a run made before the scale was in its config
    assert training_mpp(run) == 0.25
    run.config = {"dataset": {"root": str(tmp_path / "moved")}}
    assert training_mpp(run) is None
