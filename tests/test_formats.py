"""AF readers behind ``open_af``: OME-TIFF, QPTIFF, CZI and OME-Zarr files written by each
format's own writer are read back exactly, tiled and stained like the OME-TIFF."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from format_writers import MPP, WRITERS, write
from torch import nn

from vstain_cli.errors import InputError
from vstain_cli.infer.run import Run
from vstain_cli.infer.stain import StainOptions, stain_slide
from vstain_cli.io.slides import detect_format, open_af, open_image
from vstain_cli.train.presets import load_preset

pytestmark = [  # ome-zarr's own writer (used to make test files) warns about its defaults
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr.writer"),
    pytest.mark.filterwarnings("ignore:Scale value not provided:UserWarning"),
]

FORMATS = list(WRITERS)
NAMES = {"ome-tiff": "ome-tiff", "tiff": "tiff", "qptiff": "qptiff", "czi": "czi", "ome-zarr-0.4": "ome-zarr", "ome-zarr-0.5": "ome-zarr"}


@pytest.fixture(scope="module")
def cube() -> np.ndarray:
    """(300, 410, 4) uint16: a textured bright ellipse (tissue) on dark glass, plus noise."""
    h, w = 300, 410
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    base = 200 + inside * (1800 + 600 * np.sin(xx / 23) * np.cos(yy / 17))
    af = np.stack([base * (0.6 + 0.2 * c) for c in range(4)], axis=2)
    af += np.random.default_rng(0).normal(0, 5, af.shape)
    return np.clip(af, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def files(cube, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    return {f: write(f, folder, cube) for f in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_returns_the_written_pixels_scale_and_levels(files, cube, fmt):
    with open_af(files[fmt]) as s:
        assert s.format == NAMES[fmt]
        assert (s.width, s.height, s.channels, s.dtype) == (410, 300, 4, np.uint16)
        assert s.mpp == pytest.approx(MPP)
        np.testing.assert_array_equal(s.read_region(57, 31, 120, 90), cube[31:121, 57:177])
        edge = s.read_region(380, 280, 50, 40)  # partly outside: zero-filled
        np.testing.assert_array_equal(edge[:20, :30], cube[280:, 380:])
        assert not edge[20:].any() and not edge[:, 30:].any()
        if fmt != "czi":  # pylibCZIrw writes no pyramid; the others were given one level more
            assert s.level_dimensions == [(410, 300), (205, 150)]
            assert s.read_region(0, 0, 205, 150, level=1).shape == (150, 205, 4)
        thumb, ds = s.thumbnail(100, channel_sum=True)  # from level 1 where there is one
        assert ds == (5.0 if fmt == "czi" else 4.0) and thumb.shape == (int(300 // ds), int(410 // ds), 1)


@pytest.mark.parametrize("fmt", ["czi", "qptiff", "ome-zarr-0.4"])
def test_format_is_detected_from_the_content_not_the_suffix(files, tmp_path, fmt, cube):
    src = files[fmt]
    disguised = tmp_path / "slide.tif"  # a misleading suffix
    if src.is_dir():
        disguised = tmp_path / "slide"
        shutil.copytree(src, disguised)
    else:
        shutil.copy(src, disguised)
    assert detect_format(disguised) == ("ome-zarr" if fmt.startswith("ome-zarr") else "tiff" if fmt == "qptiff" else "czi")
    with open_af(disguised) as s:
        assert s.format == NAMES[fmt]
        np.testing.assert_array_equal(s.read_region(0, 0, 64, 64), cube[:64, :64])


def test_bioformats2raw_layout_opens_the_first_image(files, tmp_path, cube):
    root = tmp_path / "b2r.zarr"
    root.mkdir()
    shutil.copytree(files["ome-zarr-0.4"], root / "0")
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text(json.dumps({"bioformats2raw.layout": 3}))
    with open_af(root) as s:
        assert s.channels == 4 and s.mpp == pytest.approx(MPP)
        np.testing.assert_array_equal(s.read_region(100, 100, 30, 30), cube[100:130, 100:130])


def test_known_but_unreadable_files_give_one_line_naming_the_file(tmp_path, files):
    junk_czi = tmp_path / "junk.czi"
    junk_czi.write_bytes(b"not a czi" * 50)
    with pytest.raises(InputError, match="not a readable CZI") as e:
        open_af(junk_czi)
    assert str(junk_czi) in str(e.value) and "\n" not in str(e.value)
    cut = tmp_path / "cut.czi"
    data = files["czi"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])  # the magic survives, the directory does not
    with pytest.raises(InputError, match="not a readable CZI"):
        open_af(cut)
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    with pytest.raises(InputError, match="not an OME-Zarr image"):
        open_af(plain)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(InputError, match="not a readable OME-Zarr"):
        open_af(empty)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InputError, match="not a file"):
        open_af(folder)
    q = files["qptiff"].read_bytes()
    (tmp_path / "cut.qptiff").write_bytes(q[: len(q) // 2])
    with pytest.raises(InputError, match="truncated|not a readable TIFF"):
        with open_af(tmp_path / "cut.qptiff") as s:
            s.read_region(0, 0, 410, 300)


def test_brightfield_czi_is_refused(tmp_path):
    from pylibCZIrw import czi as pyczi

    path = tmp_path / "rgb.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as out:
        out.write(np.zeros((64, 64, 3), np.uint8), plane={"C": 0})
    with pytest.raises(InputError, match="not grey AF"):
        open_af(path)


# ----------------------------------------------------------------------------- stain and tile


class FirstChannels(nn.Module):
    def forward(self, cond):
        return cond[:, :3]


def identity_run(folder: Path, channels: int = 4, mpp: float | None = MPP, model: nn.Module | None = None) -> Run:
    """A regression 'model' whose stain is the first three normalised AF channels (or ``model``'s)."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"kind": "regression"}))
    low, high = np.full(channels, 200, np.float32), np.full(channels, 3000, np.float32)
    return Run(folder, {"dataset": {"mpp": mpp}}, load_preset("tiny-regression"), "regression", channels, 32, 0,
               torch.device("cpu"), model or FirstChannels(), af_low=low, af_high=high)


def _pixels(path: Path) -> np.ndarray:
    with open_image(path) as s:
        return s.read_region(0, 0, s.width, s.height)


def test_every_format_stains_to_the_same_slide(files, tmp_path):
    run = identity_run(tmp_path / "run")
    opts = StainOptions(region=160, compression="zlib", batch_size=8)
    ref = stain_slide(files["ome-tiff"], run, tmp_path / "ref.tif", opts)
    want = _pixels(ref.out)
    assert want.shape == (300, 410, 3) and want.std() > 10
    # The tissue mask comes from a thumbnail of the coarsest fitting level: the CZI has no
    # pyramid and ome-zarr's level 1 is resized, not decimated like the TIFF writers' here,
    # so their mask edge may move by a thumbnail pixel (4-5 px); the section is compared
    # from 16 px inwards, where every format must give the same pixels.
    from scipy.ndimage import binary_erosion

    core = binary_erosion((want < 250).any(axis=2), iterations=16)
    assert core.sum() > 40_000
    for fmt in FORMATS[1:]:
        got = _pixels(stain_slide(files[fmt], run, tmp_path / f"{fmt}.tif", opts).out)
        if fmt not in ("tiff", "qptiff"):
            np.testing.assert_array_equal(got[core], want[core], err_msg=fmt)
        else:  # same pyramid, same mask: the same slide to the pixel
            np.testing.assert_array_equal(got, want, err_msg=fmt)


def test_channel_count_differing_from_the_model_is_one_line(files, tmp_path):
    run = identity_run(tmp_path / "run5", channels=5)
    for fmt in ("czi", "ome-zarr-0.5"):
        with pytest.raises(InputError, match="AF has 4 channels but model run5 was trained on 5") as e:
            stain_slide(files[fmt], run, tmp_path / "x.tif", StainOptions())
        assert str(files[fmt]) in str(e.value)


def test_tile_reads_every_format_like_the_ome_tiff(phantom_pairs, tmp_path):
    """Five phantom AF slides converted to plain TIFF, QPTIFF, CZI and OME-Zarr 0.4/0.5 tile to the
    patches the original OME-TIFFs hold."""
    from vstain_cli.data.store import open_dataset, read_index
    from vstain_cli.data.tiling import TileOptions, tile

    src = phantom_pairs.parent
    rows = list(csv.DictReader(open(phantom_pairs)))
    converted = {}
    targets = ["tiff", "qptiff", "czi", "ome-zarr-0.4", "ome-zarr-0.5"]
    for row, fmt in zip(rows, targets):
        with open_af(src / row["af"]) as s:
            hwc = s.read_region(0, 0, s.width, s.height)
        path = write(fmt, tmp_path, hwc, name=f"{row['slide_id']}.{WRITERS[fmt][1]}")
        converted[row["slide_id"]] = src / row["af"]
        row["af"], row["he"] = str(path), str(src / row["he"])
    for row in rows[len(targets):]:
        row["af"], row["he"] = str(src / row["af"]), str(src / row["he"])
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "dataset"
    tile(pairs, out, TileOptions(size=64, stride=64, min_tissue=0.5))
    info = open_dataset(out)
    assert info.meta["mpp"] == pytest.approx(0.5)
    checked = 0
    for sid, original in converted.items():
        mine = [r for r in read_index(out) if r["slide_id"] == sid]
        if not mine:
            continue
        af, _ = info.arrays(sid)
        with open_af(original) as s:
            for r in mine:
                np.testing.assert_array_equal(af[r["row"]], s.read_region(r["x"], r["y"], 64, 64).transpose(2, 0, 1))
                checked += 1
    assert checked > 20


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def micro_regression(tmp_path_factory) -> Path:
    """A real (micro, 2-step) regression run on 4 AF channels at 0.5 µm/px."""
    from conftest import make_tiny_dataset
    from train_helpers import micro

    from vstain_cli.train.loop import train

    root = tmp_path_factory.mktemp("micro-reg")
    data = make_tiny_dataset(root / "dataset", channels=4)
    train(micro("tiny-regression", train={"steps": 2, "batch_size": 2}), data, root / "run", device="cpu")
    return root / "run"


def test_cli_stains_a_czi_into_ome_zarr(files, micro_regression, tmp_path):
    """``vstain stain AF.czi --format zarr``: an OME-Zarr that ome-zarr's reader opens at every level."""
    from conftest import run_cli
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = tmp_path / "stained"  # no suffix: --format decides
    proc = run_cli("stain", str(files["czi"]), "-m", str(micro_regression), "-o", str(out), "--format", "zarr",
                   "--region", "256")
    assert proc.returncode == 0, proc.stderr
    node = list(Reader(parse_url(str(out)))())[0]
    assert [tuple(d.shape) for d in node.data] == [(3, 300, 410)]  # smaller than one 256-px level step
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, MPP, MPP]
    with open_image(out) as s:
        assert s.format == "ome-zarr" and s.mpp == pytest.approx(MPP) and s.channels == 3
        assert s.read_region(0, 0, s.width, s.height).std() > 0


def test_cli_unreadable_known_formats_and_channel_mismatch_are_one_line(files, micro_regression, tmp_path, cube):
    from conftest import assert_one_error_line, run_cli

    out = tmp_path / "o.tif"
    junk = tmp_path / "junk.czi"
    junk.write_bytes(b"not a czi" * 50)
    assert_one_error_line(run_cli("stain", str(junk), "-m", str(micro_regression), "-o", str(out)),
                          "junk.czi", "not a readable CZI")
    broken = tmp_path / "broken.zarr"
    shutil.copytree(files["ome-zarr-0.4"], broken)
    (broken / ".zattrs").write_text("{ not json")
    assert_one_error_line(run_cli("uncertainty", str(broken), "-m", str(micro_regression), "-o", str(tmp_path / "u")),
                          "broken.zarr", "not a readable OME-Zarr")
    five = write("ome-zarr-0.5", tmp_path, np.concatenate([cube, cube[..., :1]], axis=2), name="five.ome.zarr")
    assert_one_error_line(run_cli("stain", str(five), "-m", str(micro_regression), "-o", str(out)),
                          "five.ome.zarr", "AF has 5 channels but model run was trained on 4")
    (tmp_path / "pairs.csv").write_text("slide_id,af,he,label\na,junk.czi,junk.czi,0\n")
    assert_one_error_line(run_cli("tile", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "ds")),
                          "junk.czi", "not a readable CZI")
    assert not out.exists() and not (tmp_path / "ds").exists()


def test_cli_refuses_stacks_ndpi_and_rgb_he_as_af_in_one_line(cube, micro_regression, tmp_path):
    """A Bio-Formats-style T=2, Z=3, C=2 OME-TIFF, an NDPI and an RGB H&E TIFF given as AF: exit 2, one line."""
    import tifffile
    from conftest import assert_one_error_line, run_cli
    from format_writers import write_ndpi_like, write_ome_stack

    out = tmp_path / "o.tif"
    stack = write_ome_stack(tmp_path / "tzc.ome.tif", np.zeros((2, 3, 2, 32, 48), np.uint16), "TZCYX")
    assert_one_error_line(run_cli("stain", str(stack), "-m", str(micro_regression), "-o", str(out)),
                          "tzc.ome.tif", "T=2, Z=3, C=2")
    rgb = np.repeat((cube[..., :1] >> 4).astype(np.uint8), 3, axis=2)
    ndpi = write_ndpi_like(tmp_path / "he.ndpi", rgb[:256, :384])
    assert_one_error_line(run_cli("uncertainty", str(ndpi), "-m", str(micro_regression), "-o", str(tmp_path / "u")),
                          "he.ndpi", "Hamamatsu NDPI")
    tifffile.imwrite(tmp_path / "he.tif", rgb, photometric="rgb", tile=(64, 64))
    assert_one_error_line(run_cli("stain", str(tmp_path / "he.tif"), "-m", str(micro_regression), "-o", str(out)),
                          "he.tif", "looks like an RGB H&E slide")
    assert not out.exists() and not (tmp_path / "u").exists()
