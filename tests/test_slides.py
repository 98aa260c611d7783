"""Slide readers: AF layouts through tifffile, H&E through OpenSlide, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import SHARED_SVS

from vstain_cli.errors import InputError
from vstain_cli.io.slides import OpenSlideSlide, TiffSlide, open_af, open_he


@pytest.fixture(scope="module")
def cube() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 60000, (6, 300, 410)).astype(np.uint16)


@pytest.mark.parametrize(
    "layout",
    ["ome_cyx_tiled", "planar_separate", "contig_tiled", "contig_strips", "float32", "uint8"],
)
def test_af_region_reads_match_the_array(tmp_path, cube, layout):
    path = tmp_path / f"{layout}.tif"
    data = cube
    if layout == "ome_cyx_tiled":
        tifffile.imwrite(path, data, ome=True, tile=(64, 64), metadata={"axes": "CYX"}, compression="zlib")
    elif layout == "planar_separate":
        tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate", tile=(64, 64))
    else:
        hwc = data.transpose(1, 2, 0)
        if layout == "float32":
            hwc = hwc.astype(np.float32) / 7
        if layout == "uint8":
            hwc = (hwc >> 8).astype(np.uint8)
        kw = {"rowsperstrip": 16} if layout == "contig_strips" else {"tile": (32, 48 + 16)}
        tifffile.imwrite(path, hwc, photometric="minisblack", planarconfig="contig", **kw)
        data = hwc.transpose(2, 0, 1)
    with open_af(path) as slide:
        assert slide.channels == 6 and (slide.width, slide.height) == (410, 300)
        got = slide.read_region(50, 60, 100, 70)
        np.testing.assert_array_equal(got, data[:, 60:130, 50:150].transpose(1, 2, 0))
        edge = slide.read_region(380, 280, 50, 40)  # partly outside: zero-filled
        np.testing.assert_array_equal(edge[:20, :30], data[:, 280:, 380:].transpose(1, 2, 0))
        assert not edge[20:].any() and not edge[:, 30:].any()


def test_thumbnail_is_block_mean(tmp_path, cube):
    path = tmp_path / "c.tif"
    hwc = cube.transpose(1, 2, 0)
    tifffile.imwrite(path, hwc, photometric="minisblack", planarconfig="contig", tile=(64, 64))
    with open_af(path) as slide:
        thumb, ds = slide.thumbnail(100)
    assert ds == 5.0 and thumb.shape == (60, 82, 6)
    expect = hwc[:300, :410].astype(np.float64).reshape(60, 5, 82, 5, 6).mean(axis=(1, 3))
    assert np.abs(thumb.astype(np.float64) - expect).max() <= 0.5


def test_real_svs_opens_through_openslide():
    with open_he(SHARED_SVS) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        region = slide.read_region(1000, 1000, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8


def test_rgb_tiff_that_openslide_rejects_falls_back_to_tifffile(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (200, 300, 3)).astype(np.uint8)
    path = tmp_path / "striped.tif"
    tifffile.imwrite(path, img, photometric="rgb")  # not tiled: OpenSlide refuses it
    with open_he(path) as slide:
        assert isinstance(slide, TiffSlide)
        np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), img[20:60, 10:40])


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.tif"
    with pytest.raises(InputError, match="file not found") as e:
        open_af(missing)
    assert str(missing) in str(e.value)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(InputError, match="not a readable TIFF"):
        open_af(junk)
    with pytest.raises(InputError, match="junk.tif"):
        open_he(junk)


def test_truncated_tiff_is_reported(tmp_path, cube):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, cube.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig", tile=(64, 64))
    cut = tmp_path / "cut.tif"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|not a readable"):
        with open_af(cut) as s:
            s.read_region(0, 0, 410, 300)


def test_unsupported_af_dtype(tmp_path):
    path = tmp_path / "i32.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.int32), photometric="minisblack", planarconfig="contig")
    with pytest.raises(InputError, match="dtype int32"):
        open_af(path)
