"""``tile`` core: dataset format, split by slide, train-only normalisation, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED_SVS

from vstain_cli.data import tiling
from vstain_cli.data.store import open_dataset, read_index
from vstain_cli.data.tiling import TileOptions, tile
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.io.slides import open_af, open_he


@pytest.fixture(scope="module")
def tiled(phantom_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "dataset"
    summary = tile(phantom_pairs, out, TileOptions(size=64, stride=64, min_tissue=0.5))
    return out, summary


def test_dataset_format_and_patch_contents(tiled, phantom_pairs):
    out, summary = tiled
    info = open_dataset(out)
    assert info.channels == 5 and info.tile_size == 64 and info.af_dtype == "uint16"
    rows = read_index(out)
    assert len(rows) == sum(r.patches for r in summary.slides) > 20
    # every patch equals the slide region it claims to come from
    row = rows[len(rows) // 2]
    af, he = info.arrays(row["slide_id"])
    folder = phantom_pairs.parent
    with open_af(folder / f"{row['slide_id']}.af.ome.tif") as a, open_he(folder / f"{row['slide_id']}.he.tif") as h:
        np.testing.assert_array_equal(af[row["row"]], a.read_region(row["x"], row["y"], 64, 64).transpose(2, 0, 1))
        np.testing.assert_array_equal(he[row["row"]], h.read_region(row["x"], row["y"], 64, 64).transpose(2, 0, 1))
    assert all(r["tissue_fraction"] >= 0.5 for r in rows)


def test_split_by_slide_and_normalisation_from_train_only(tiled):
    out, summary = tiled
    meta = json.loads((out / "dataset.json").read_text())
    per_slide = {}
    for r in read_index(out):
        per_slide.setdefault(r["slide_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_slide.values())  # no slide in two splits
    assert {r.split for r in summary.slides} == {"train", "val", "test"}
    norm = meta["af_normalization"]
    train = [r.slide_id for r in summary.slides if r.split == "train"]
    pix = np.concatenate([np.load(out / "slides" / s / "af.npy")[:, :, ::4, ::4].transpose(1, 0, 2, 3).reshape(5, -1)
                          for s in train], axis=1)
    assert norm["from_split"] == "train"
    assert np.all(np.array(norm["low"]) >= pix.min(axis=1)) and np.all(np.array(norm["high"]) <= pix.max(axis=1))
    assert meta["software"]["vstain"] and meta["slides"][train[0]]["af"]["sha256_head_tail"]


def test_interrupted_run_resumes_to_the_same_dataset(phantom_pairs, tiled, tmp_path, monkeypatch):
    ref_out, _ = tiled
    out = tmp_path / "dataset"
    calls = {"n": 0}
    real = tiling._tile_slide

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "_tile_slide", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        tile(phantom_pairs, out, TileOptions(size=64, stride=64))
    assert len(list((out / "slides").iterdir())) == 2 and not (out / "dataset.json").exists()
    monkeypatch.setattr(tiling, "_tile_slide", real)
    summary = tile(phantom_pairs, out, TileOptions(size=64, stride=64))
    assert sum(r.resumed for r in summary.slides) == 2
    assert (out / "index.csv").read_text() == (ref_out / "index.csv").read_text()
    for sid in (p.name for p in (ref_out / "slides").iterdir()):
        for name in ("af.npy", "he.npy"):
            assert (out / "slides" / sid / name).read_bytes() == (ref_out / "slides" / sid / name).read_bytes()


def test_other_settings_need_force(phantom_pairs, tmp_path):
    out = tmp_path / "d"
    tile(phantom_pairs, out, TileOptions(size=64, stride=64))
    with pytest.raises(OutputExistsError, match="--force"):
        tile(phantom_pairs, out, TileOptions(size=32, stride=32))
    s = tile(phantom_pairs, out, TileOptions(size=32, stride=32), force=True)
    assert open_dataset(out).tile_size == 32 and not any(r.resumed for r in s.slides)


def test_mismatched_pairs_are_refused(phantom_pairs, tmp_path):
    folder = phantom_pairs.parent
    import tifffile

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((100, 100, 5), np.uint16), photometric="minisblack", planarconfig="contig")
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.zeros((512, 640, 3), np.uint16), photometric="minisblack", planarconfig="contig")
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"slide_id,af,he,label\na,{small},{folder / 'phantom-000.he.tif'},1\n")
    with pytest.raises(InputError, match="co-registered") as e:
        tile(csv, tmp_path / "o1")
    assert "small.tif" in str(e.value)
    csv.write_text(f"slide_id,af,he,label\na,{folder / 'phantom-000.af.ome.tif'},{folder / 'phantom-000.he.tif'},1\n"
                   f"b,{other},{folder / 'phantom-001.he.tif'},1\n")
    with pytest.raises(InputError, match="3 channels but phantom-000.af.ome.tif has 5"):
        tile(csv, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_real_svs_tiles(tmp_path):
    """The real H&E slide as both sides of a pair (AF stand-in: its RGB planes as 3 channels)."""
    import tifffile

    with open_he(SHARED_SVS) as he:
        rgb = he.read_region(0, 0, he.width, he.height)
    af = tmp_path / "af.tif"
    tifffile.imwrite(af, rgb, photometric="minisblack", planarconfig="contig", tile=(256, 256))
    shutil.copy(SHARED_SVS, tmp_path / "he.svs")
    csv = tmp_path / "pairs.csv"
    csv.write_text("slide_id,af,he,label,split\ncmu1,af.tif,he.svs,1,train\n")
    summary = tile(csv, tmp_path / "ds")
    (r,) = summary.slides
    assert 80 < r.patches < 250
    he_patches = np.load(tmp_path / "ds" / "slides" / "cmu1" / "he.npy")
    assert he_patches.mean() < 215  # tissue, not glass
