"""Slide readers: AF layouts through tifffile, H&E through OpenSlide, bad files; OME dimension
order (T, Z, C) honoured, stacks, NDPI and RGB H&E given as AF refused in one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from conftest import SHARED_SVS
from format_writers import write_czi, write_ndpi_like, write_ome_stack

from vstain_cli.errors import InputError
from vstain_cli.io.slides import OpenSlideSlide, TiffSlide, open_af, open_he, openslide_vendor


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


def _one_line(e: pytest.ExceptionInfo, path, *needles: str) -> None:
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# ----------------------------------------------------------------------------- OME dimension order


STACKS = {  # tifffile axes -> the sizes it writes (T=2, Z=3, C=2 where present)
    "TZCYX": (2, 3, 2), "ZTCYX": (3, 2, 2), "CTZYX": (2, 2, 3), "CZYX": (2, 3), "ZCYX": (3, 2), "TCYX": (2, 2),
    "TZYX": (2, 3),
}


@pytest.mark.parametrize("axes", list(STACKS))
def test_ome_time_series_and_z_stacks_are_refused_whatever_the_dimension_order(tmp_path, axes):
    """A T=2, Z=3, C=2 OME-TIFF used to read as 12 channels; every order is now one line with the sizes."""
    shape = STACKS[axes] + (32, 48)
    path = write_ome_stack(tmp_path / f"{axes}.ome.tif", np.zeros(shape, np.uint16), axes)
    order = tifffile.TiffFile(path).ome_metadata.split('DimensionOrder="')[1][:5]
    sizes = dict(zip(axes, STACKS[axes]))
    with pytest.raises(InputError) as e:
        open_af(path)
    _one_line(e, path, "time series or z stack", f"DimensionOrder {order}",
              *(f"{a}={sizes.get(a, 1)}" for a in "TZC"))


def test_imagej_hyperstack_is_refused(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 2, 32, 48), np.uint16), imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(InputError) as e:
        open_af(path)
    _one_line(e, path, "T=2, Z=3, C=2", "axes TZCYX")


@pytest.mark.parametrize("axes", ["TZCYX", "ZTCYX", "CZTYX", "TCZYX"])
def test_single_plane_ome_reads_c_channels_in_any_dimension_order(tmp_path, cube, axes):
    """T = Z = 1: the channels are C, in C order, whatever DimensionOrder says."""
    data = cube[:4, :64, :96]
    shape = tuple(4 if a == "C" else 1 for a in axes[:3]) + data.shape[1:]
    path = write_ome_stack(tmp_path / "one.ome.tif", data.reshape(shape), axes)
    with open_af(path) as s:
        assert s.channels == 4 and (s.width, s.height) == (96, 64)
        np.testing.assert_array_equal(s.read_region(0, 0, 96, 64), data.transpose(1, 2, 0))


def _two_file_ome(folder, cube, uuids=("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222")):
    """A multi-file OME-TIFF: channels 0-1 in a.ome.tif, 2-3 in b.ome.tif (OME TiffData with UUID FileName)."""
    ch = [f'<Channel ID="Channel:0:{c}" SamplesPerPixel="1"/>' for c in range(4)]
    tiffdata = "".join(f'<TiffData FirstC="{2 * i}" IFD="0" PlaneCount="2"><UUID FileName="{n}">urn:uuid:{u}</UUID>'
                       "</TiffData>" for i, (n, u) in enumerate(zip(("a.ome.tif", "b.ome.tif"), uuids)))
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
           f'UUID="urn:uuid:{uuids[0]}"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZTC" '
           'Type="uint16" SizeX="96" SizeY="64" SizeC="4" SizeZ="1" SizeT="1">' + "".join(ch) + tiffdata +
           "</Pixels></Image></OME>")
    data = cube[:4, :64, :96]
    tifffile.imwrite(folder / "a.ome.tif", data[:2], photometric="minisblack", description=xml, metadata=None)
    with tifffile.TiffWriter(folder / "b.ome.tif") as tw:
        for c in (2, 3):
            tw.write(data[c], photometric="minisblack", metadata=None)
    return folder / "a.ome.tif", data


def test_multi_file_ome_tiff_reads_every_plane_or_names_the_missing_ones(tmp_path, cube):
    path, data = _two_file_ome(tmp_path, cube)
    with open_af(path) as s:
        assert s.channels == 4
        np.testing.assert_array_equal(s.read_region(10, 5, 50, 40), data[:, 5:45, 10:60].transpose(1, 2, 0))
    (tmp_path / "b.ome.tif").unlink()  # it used to read as 2 channels, silently
    with pytest.raises(InputError) as e:
        open_af(path)
    _one_line(e, path, "2 of 4 image planes are missing")


@pytest.mark.parametrize("dims", [{"Z": 3}, {"T": 2}])
def test_czi_stacks_are_refused_with_their_sizes(tmp_path, dims):
    from pylibCZIrw import czi as pyczi

    path = tmp_path / "stack.czi"
    (dim, n), = dims.items()
    with pyczi.create_czi(str(path), exist_ok=True) as out:
        for i in range(n):
            for c in range(2):
                out.write(np.zeros((32, 32, 1), np.uint16), plane={"C": c, dim: i})
    with pytest.raises(InputError) as e:
        open_af(path)
    _one_line(e, path, "time series or z stack", f"{dim}={n}", "C=2")


def test_czi_single_plane_still_reads(tmp_path, cube):
    hwc = cube[:3, :100, :130].transpose(1, 2, 0)
    with open_af(write_czi(tmp_path / "one.czi", hwc)) as s:
        assert s.channels == 3
        np.testing.assert_array_equal(s.read_region(0, 0, 130, 100), hwc)


def _write_tczyx_zarr(path, array):
    """ome-zarr-py's writer, 5D ``t, c, z, y, x`` (the NGFF axis order), one level."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    store = parse_url(str(path), mode="w", fmt=FormatV04()).store
    write_image(image=array, group=zarr.group(store=store, zarr_format=2), axes="tczyx", scale_factors=(),
                storage_options={"chunks": (1, 1, 1, 32, 32)}, fmt=FormatV04())
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr.writer")
@pytest.mark.filterwarnings("ignore:Scale value not provided:UserWarning")
def test_ome_zarr_tczyx_reads_c_channels_and_refuses_stacks(tmp_path, cube):
    data = cube[:4, :64, :96]
    one = _write_tczyx_zarr(tmp_path / "one.zarr", data[None, :, None])
    with open_af(one) as s:
        assert s.channels == 4
        np.testing.assert_array_equal(s.read_region(0, 0, 96, 64), data.transpose(1, 2, 0))
    stack = _write_tczyx_zarr(tmp_path / "stack.zarr", np.zeros((2, 2, 3, 32, 48), np.uint16))
    with pytest.raises(InputError) as e:
        open_af(stack)
    _one_line(e, stack, "planes")


# ----------------------------------------------------------------------------- NDPI and RGB H&E


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    h, w = 256, 384
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([200 - (xx % 64), 120 + (yy % 50), 160 + (xx + yy) % 40], -1).astype(np.uint8)


def test_ndpi_is_read_as_he_through_openslide(tmp_path, he_rgb):
    path = write_ndpi_like(tmp_path / "slide.ndpi", he_rgb)
    assert openslide_vendor(path) == "hamamatsu"
    with open_he(path) as s:
        assert isinstance(s, OpenSlideSlide) and s.vendor == "hamamatsu"
        assert (s.width, s.height) == (384, 256) and s.mpp == pytest.approx(0.5)
        err = np.abs(s.read_region(40, 30, 128, 96).astype(int) - he_rgb[30:126, 40:168])
        assert err.mean() < 1.5 and err.max() <= 16  # JPEG at quality 95


@pytest.mark.parametrize("name", ["slide.ndpi", "renamed.tif"])
def test_ndpi_given_as_af_is_one_line(tmp_path, he_rgb, name):
    """As AF an NDPI used to reach tifffile and fail in the JPEG decoder at the first read."""
    path = write_ndpi_like(tmp_path / name, he_rgb)
    with pytest.raises(InputError) as e:
        open_af(path)
    _one_line(e, path, "Hamamatsu NDPI", "not multi-channel AF")
    if name.endswith(".tif"):  # tifffile sees is_ndpi: its McuStarts tiles need the NDPI JPEG header
        with pytest.raises(InputError) as e:
            TiffSlide(path)
        _one_line(e, path, "Hamamatsu NDPI slide is read through OpenSlide")


@pytest.mark.parametrize("kind", ["tiled", "ome", "jpeg"])
def test_rgb_he_given_as_af_says_it_looks_like_an_rgb_he(tmp_path, he_rgb, kind):
    path = tmp_path / f"he_{kind}.tif"
    if kind == "tiled":
        tifffile.imwrite(path, he_rgb, photometric="rgb", tile=(64, 64))
    elif kind == "ome":
        tifffile.imwrite(path, he_rgb, ome=True, photometric="rgb", metadata={"axes": "YXS"})
    else:
        tifffile.imwrite(path, he_rgb, photometric="rgb", tile=(64, 64), compression="jpeg")
    with pytest.raises(InputError) as e:
        open_af(path, model_channels=26)
    _one_line(e, path, "looks like an RGB H&E slide", "3 channels of uint8", "the model expects 26 AF channels")
    with open_he(path) as s:  # and it is a fine H&E
        assert s.channels == 3


def test_three_grey_channels_of_uint8_are_still_af(tmp_path, he_rgb):
    path = tmp_path / "af3.tif"
    tifffile.imwrite(path, he_rgb, photometric="minisblack", planarconfig="contig", tile=(64, 64))
    with open_af(path) as s:
        assert s.channels == 3


def test_real_svs_given_as_af_is_one_line():
    with pytest.raises(InputError) as e:
        open_af(SHARED_SVS)
    _one_line(e, SHARED_SVS, "Aperio SVS", "not multi-channel AF")


def test_damaged_svs_tile_is_one_line_at_read_time(tmp_path):
    """A copy of the real SVS with its first JPEG tile zeroed: OpenSlide opens it, the read fails."""
    path = tmp_path / "damaged.svs"
    shutil.copy(SHARED_SVS, path)
    page = tifffile.TiffFile(path).pages[0]
    with open(path, "r+b") as f:
        f.seek(page.dataoffsets[0])
        f.write(b"\x00" * page.databytecounts[0])
    with open_he(path) as s:
        assert isinstance(s, OpenSlideSlide)
        with pytest.raises(InputError) as e:
            s.read_region(0, 0, 64, 64)
    _one_line(e, path, "OpenSlide cannot read a region")


def test_undecodable_tile_data_is_one_line_at_read_time(tmp_path, cube):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, cube.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig", tile=(64, 64),
                     compression="zlib")
    page = tifffile.TiffFile(path).pages[0]
    offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * count)  # same size, not zlib any more
    with open_af(path) as s:
        with pytest.raises(InputError) as e:
            s.read_region(0, 0, 64, 64)
    _one_line(e, path, "cannot decode TIFF image data")
