"""OME-Zarr output: ``write_ngff`` streams strips into an NGFF 0.4 multiscale that
ome-zarr's own reader opens with its levels and µm scales; ``stain`` and
``uncertainty`` write it with ``--format zarr``."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from format_writers import write_ome_tiff
from test_formats import identity_run
from test_stain import OracleEps

from vstain_cli.diffusion.schedule import Schedule
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.infer.run import Run
from vstain_cli.infer.stain import StainOptions, stain_slide
from vstain_cli.io.ngff import read_ngff_provenance, write_ngff
from vstain_cli.io.slides import open_af, open_image
from vstain_cli.io.tiff import _downsample2, level_shapes
from vstain_cli.train.presets import load_preset

pytestmark = [  # ome-zarr's own writer (used to make test files) warns about its defaults
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr.writer"),
    pytest.mark.filterwarnings("ignore:Scale value not provided:UserWarning"),
]


def _ome_zarr_levels(path: Path) -> tuple[list[np.ndarray], list[list[dict]], list[dict]]:
    """(arrays per level, coordinate transformations per level, axes) through ome-zarr's reader."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = list(Reader(parse_url(str(path)))())[0]
    return [np.asarray(d) for d in node.data], node.metadata["coordinateTransformations"], node.metadata["axes"]


def _strips(img: np.ndarray, rows: int):
    for y in range(0, img.shape[0], rows):
        yield img[y : y + rows]


@pytest.mark.parametrize("rows", [7, 300])
def test_streamed_rgb_pyramid_opens_with_ome_zarr_levels_and_scale(tmp_path, rows):
    img = np.random.default_rng(rows).integers(0, 256, (1100, 1300, 3)).astype(np.uint8)
    out = tmp_path / "slide.zarr"
    shapes = write_ngff(out, _strips(img, rows), 1100, 1300, 3, np.uint8, mpp=0.25, metadata={"model": "m"})
    assert shapes == level_shapes(1100, 1300, 512) == [(1100, 1300), (550, 650)]
    data, transforms, axes = _ome_zarr_levels(out)
    assert [a["name"] for a in axes] == ["c", "y", "x"] and axes[2]["unit"] == "micrometer"
    assert [d.shape for d in data] == [(3, 1100, 1300), (3, 550, 650)]
    np.testing.assert_array_equal(data[0].transpose(1, 2, 0), img)
    np.testing.assert_array_equal(data[1].transpose(1, 2, 0), _downsample2(img))  # the TIFF pyramid's 2x2 mean
    assert transforms[0][0]["scale"] == [1.0, 0.25, 0.25] and transforms[1][0]["scale"] == [1.0, 0.5, 0.5]
    assert read_ngff_provenance(out) == {"model": "m", "mpp": 0.25}
    assert not list(tmp_path.glob(".*partial*"))
    with open_image(out) as s:  # and vstain's own reader sees the same
        assert s.mpp == pytest.approx(0.25) and s.level_dimensions == [(1300, 1100), (650, 550)]


def test_float_map_and_many_levels(tmp_path):
    img = np.random.default_rng(1).random((2100, 900, 1)).astype(np.float32)
    out = tmp_path / "w.zarr"
    shapes = write_ngff(out, _strips(img, 256), 2100, 900, 1, np.float32, mpp=0.5, min_level_size=256)
    assert shapes == [(2100, 900), (1050, 450), (525, 225), (262, 112)]
    data, transforms, _ = _ome_zarr_levels(out)
    np.testing.assert_array_equal(data[0][0], img[..., 0])
    expect = img
    for k in range(1, 4):
        expect = _downsample2(expect)
        np.testing.assert_allclose(data[k][0], expect[..., 0], rtol=1e-6)
        # a level-k pixel is 2^k level-0 pixels wide, its centre (2^k - 1) / 2 of them inwards
        assert transforms[k] == [{"type": "scale", "scale": [1.0, 0.5 * 2**k, 0.5 * 2**k]},
                                 {"type": "translation", "translation": [0.0, 0.25 * (2**k - 1), 0.25 * (2**k - 1)]}]


def test_writer_holds_strips_not_the_slide(tmp_path):
    """Peak Python memory does not grow with the slide's height: 8x the rows, the same peak."""
    w = 1024

    def peak(h: int) -> int:
        def strips():
            for y in range(0, h, 128):
                yield np.full((128, w, 3), y % 251, np.uint8)

        tracemalloc.start()
        write_ngff(tmp_path / f"{h}.zarr", strips(), h, w, 3, np.uint8, mpp=0.5)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, big = peak(1024), peak(8192)
    assert big < 1.25 * small and big < 8192 * w * 3 / 3, (small, big)  # measured: 7.3 and 7.5 MB


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield np.zeros((256, 300, 3), np.uint8)
        raise RuntimeError("sampler died")

    with pytest.raises(RuntimeError):
        write_ngff(tmp_path / "x.zarr", broken(), 600, 300, 3)
    assert list(tmp_path.iterdir()) == []


def _af(tmp_path: Path) -> Path:
    h, w = 520, 640
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    base = 200 + inside * (1800 + 600 * np.sin(xx / 23) * np.cos(yy / 17))
    af = np.stack([base * (0.6 + 0.2 * c) for c in range(4)], axis=2).astype(np.uint16)
    return write_ome_tiff(tmp_path / "af.ome.tif", af, mpp=0.5)


def test_stain_format_zarr_is_the_tiff_slide_as_ome_zarr(tmp_path):
    af, run = _af(tmp_path), identity_run(tmp_path / "run")
    opts = dict(region=160, compression="zlib", batch_size=8)
    tif = stain_slide(af, run, tmp_path / "st.tif", StainOptions(**opts))
    res = stain_slide(af, run, tmp_path / "st.zarr", StainOptions(out_format="zarr", **opts))
    data, transforms, _ = _ome_zarr_levels(res.out)
    assert [d.shape[1:] for d in data] == [tuple(s) for s in res.levels] == [tuple(s) for s in tif.levels]
    assert transforms[0][0]["scale"] == [1.0, 0.5, 0.5] and transforms[1][0]["scale"] == [1.0, 1.0, 1.0]
    with open_image(tif.out) as t:
        np.testing.assert_array_equal(data[0].transpose(1, 2, 0), t.read_region(0, 0, t.width, t.height))
    prov = read_ngff_provenance(res.out)
    assert prov["config"]["stain"]["out_format"] == "zarr" and prov["config"]["scale"]["resampled"] is False
    assert res.thumbnail.exists()
    with pytest.raises(OutputExistsError):
        stain_slide(af, run, res.out, StainOptions(out_format="zarr", **opts))
    stain_slide(af, run, res.out, StainOptions(out_format="zarr", seed=1, **opts), force=True)  # replaced
    assert json.loads((res.out / ".zattrs").read_text())["vstain"]["config"]["stain"]["seed"] == 1
    folder = tmp_path / "notes.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an OME-Zarr image; refusing"):
        stain_slide(af, run, folder, StainOptions(out_format="zarr", **opts), force=True)
    assert (folder / "keep.txt").exists()


def test_uncertainty_format_zarr_writes_ome_zarr_maps(tmp_path):
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    af = _af(tmp_path)
    sched = Schedule.make("linear", 1000)
    folder = tmp_path / "diff"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    run = Run(folder, {"dataset": {"mpp": 0.5}}, load_preset("tiny-diffusion"), "diffusion", 4, 32, 0,
              torch.device("cpu"), OracleEps(sched), sched, "eps", False, None,
              np.full(4, 200, np.float32), np.full(4, 3000, np.float32))
    res = uncertainty_slide(af, run, tmp_path / "unc", UncertaintyOptions(
        samples=2, steps=2, region=256, batch_size=32, out_format="zarr"))
    meta = json.loads((res.out / "uncertainty.json").read_text())
    assert meta["files"]["mean"] == "mean.zarr" and meta["mpp"] == 0.5
    for name in ("lower", "upper", "mean", "width", "width_float"):
        data, transforms, _ = _ome_zarr_levels(res.out / meta["files"][name])
        assert data[0].shape[1:] == (520, 640) and transforms[0][0]["scale"] == [1.0, 0.5, 0.5]
    lower, _, _ = _ome_zarr_levels(res.out / "lower.zarr")
    upper, _, _ = _ome_zarr_levels(res.out / "upper.zarr")
    assert (lower[0] <= upper[0]).all()
    with open_af(af) as s:
        assert s.format == "ome-tiff"


def test_cli_rejects_a_bad_format_and_mpp_in_one_line(tmp_path):
    from conftest import assert_one_error_line, run_cli

    af = _af(tmp_path)
    bad = run_cli("stain", str(af), "--model", str(tmp_path / "run"), "--out", str(tmp_path / "o.png"),
                  "--format", "png")
    assert_one_error_line(bad, "--format must be one of tiff, zarr")
    bad = run_cli("uncertainty", str(af), "--model", str(tmp_path / "run"), "--out", str(tmp_path / "u"),
                  "--mpp", "-1")
    assert_one_error_line(bad, "--mpp must be between 0.01 and 100")
