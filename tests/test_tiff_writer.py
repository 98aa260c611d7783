"""The streaming pyramid writer, read back with OpenSlide and tifffile."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from vstain_cli.io.tiff import level_shapes, read_provenance, write_pyramid


def _strips(img: np.ndarray, rows: int):
    for y in range(0, img.shape[0], rows):
        yield img[y : y + rows]


def _gradient_rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], axis=2).astype(np.uint8)


def test_level_shapes_halve_until_small():
    assert level_shapes(4096, 3000, min_size=512) == [(4096, 3000), (2048, 1500), (1024, 750), (512, 375)]
    assert level_shapes(300, 200, min_size=512) == [(300, 200)]


@pytest.mark.parametrize("strip_rows", [100, 256, 333])
def test_rgb_pyramid_opens_in_openslide_with_levels_and_mpp(tmp_path, strip_rows):
    img = _gradient_rgb(1500, 1100)
    path = tmp_path / "x.tif"
    write_pyramid(path, _strips(img, strip_rows), 1500, 1100, 3, np.uint8, mpp=0.25,
                  compression="zlib", min_level_size=256, metadata={"model": "m"})
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == 3
    assert slide.level_dimensions[0] == (1100, 1500)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-3)
    region = np.asarray(slide.read_region((37, 411), 0, (300, 200)).convert("RGB"))
    np.testing.assert_array_equal(region, img[411:611, 37:337])
    level1 = np.asarray(slide.read_region((0, 0), 1, (550, 750)).convert("RGB")).astype(int)
    expect = img.reshape(750, 2, 550, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1 - expect).max() <= 1
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3 and tif.pages[0].is_tiled
        np.testing.assert_array_equal(tif.pages[0].asarray(), img)
    prov = read_provenance(path)
    assert prov["model"] == "m" and prov["mpp"] == 0.25
    assert not list(tmp_path.glob(".*partial*")), "temporary files left behind"


def test_jpeg_pyramid_is_close(tmp_path):
    img = _gradient_rgb(600, 700)
    path = tmp_path / "j.tif"
    write_pyramid(path, _strips(img, 128), 600, 700, 3, mpp=0.5, compression="jpeg", quality=95, min_level_size=128)
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count >= 3
    back = np.asarray(slide.read_region((0, 0), 0, (700, 600)).convert("RGB")).astype(int)
    assert np.abs(back - img).mean() < 3


def test_multichannel_ome_pyramid_with_subifds(tmp_path):
    rng = np.random.default_rng(0)
    af = rng.integers(0, 60000, (700, 520, 7)).astype(np.uint16)
    path = tmp_path / "af.ome.tif"
    write_pyramid(path, _strips(af, 200), 700, 520, 7, np.uint16, mpp=0.5, compression="zlib",
                  subifds=True, min_level_size=128, ome_channels=[f"c{i}" for i in range(7)], metadata={"k": 1})
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lv.shape for lv in series.levels] == [(700, 520, 7), (350, 260, 7), (175, 130, 7)]
        np.testing.assert_array_equal(series.levels[0].asarray(), af)
    assert read_provenance(path)["k"] == 1


def test_failed_write_leaves_nothing(tmp_path):
    def bad():
        yield np.zeros((256, 300, 3), np.uint8)
        raise RuntimeError("boom")

    path = tmp_path / "f.tif"
    with pytest.raises(RuntimeError):
        write_pyramid(path, bad(), 600, 300, 3, compression="zlib")
    assert list(tmp_path.iterdir()) == []


def test_wrong_number_of_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        write_pyramid(tmp_path / "f.tif", iter([np.zeros((100, 64, 3), np.uint8)]), 200, 64, 3, compression="zlib")
    assert list(tmp_path.iterdir()) == []


def _stream(n: int, rows: int, w: int, fail_at: int | None = None, interrupt: bool = False):
    for i in range(n):
        if i == fail_at:
            raise KeyboardInterrupt if interrupt else RuntimeError("producer failed")
        yield (np.full((rows, w, 3), i, np.uint8), np.full((rows, w, 1), i, np.uint16))


def _specs(tmp_path, h: int, w: int) -> list[dict]:
    return [{"path": tmp_path / "a.tif", "height": h, "width": w, "samples": 3, "dtype": np.uint8},
            {"path": tmp_path / "b.tif", "height": h, "width": w, "samples": 1, "dtype": np.uint16}]


def test_write_pyramids_writes_every_output_from_one_stream(tmp_path):
    from vstain_cli.io.tiff import write_pyramids

    write_pyramids(_specs(tmp_path, 64, 48), _stream(4, 16, 48))
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert a.shape == (64, 48, 3) and b.shape[-2:] == (64, 48)
    assert a[63, 0, 0] == 3 and int(b.reshape(64, 48)[16, 0]) == 1


@pytest.mark.parametrize("interrupt", [False, True])
def test_write_pyramids_aborts_in_seconds_and_leaves_nothing(tmp_path, interrupt):
    """A failing producer (Ctrl-C included) stops every writer thread; no output or temp file remains."""
    import threading
    import time

    from vstain_cli.io.tiff import write_pyramids

    before, t0 = threading.active_count(), time.monotonic()
    with pytest.raises(KeyboardInterrupt if interrupt else RuntimeError):
        write_pyramids(_specs(tmp_path, 64, 48), _stream(4, 16, 48, fail_at=2, interrupt=interrupt))
    assert time.monotonic() - t0 < 10
    assert list(tmp_path.iterdir()) == []
    assert threading.active_count() == before  # the writer threads ended


def test_write_pyramids_short_stream_publishes_nothing(tmp_path):
    """A stream that ends before the height is an error, and neither output is published."""
    from vstain_cli.io.tiff import write_pyramids

    with pytest.raises(ValueError):
        write_pyramids(_specs(tmp_path, 64, 48), _stream(2, 16, 48))
    assert list(tmp_path.iterdir()) == []
