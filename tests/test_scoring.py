"""Loading image sets, scoring and the HTML report (vstain_cli.score.scoring)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from test_metrics import he_like_tiles, simple_features

from vstain_cli.errors import InputError
from vstain_cli.progress import NullProgress
from vstain_cli.score import scoring


def write_pngs(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"tile_{i:03d}" for i in range(len(images))]
    for n, img in zip(names, images):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{n}.png")
    return folder


def test_load_png_folder_sorted_by_name(tmp_path):
    x = he_like_tiles(3, size=16)
    write_pngs(tmp_path / "r", x[::-1], ["c", "b", "a"])
    s = scoring.load_images(tmp_path / "r")
    assert s.names == ["a", "b", "c"]
    np.testing.assert_array_equal(s.images, x)


def test_load_tiff_and_jpeg(tmp_path):
    import tifffile

    x = he_like_tiles(2, size=16)
    (tmp_path / "t").mkdir()
    tifffile.imwrite(tmp_path / "t" / "a.tif", x[0].transpose(1, 2, 0))
    Image.fromarray(x[1].transpose(1, 2, 0)).save(tmp_path / "t" / "b.jpg", quality=95, subsampling=0)
    s = scoring.load_images(tmp_path / "t")
    np.testing.assert_array_equal(s.images[0], x[0])
    assert np.abs(s.images[1].astype(int) - x[1]).mean() < 6  # lossy JPEG


def test_load_npy_both_layouts(tmp_path):
    x = he_like_tiles(4, size=16)
    np.save(tmp_path / "chw.npy", x)
    np.save(tmp_path / "hwc.npy", x.transpose(0, 2, 3, 1))
    for f in ("chw.npy", "hwc.npy"):
        s = scoring.load_images(tmp_path / f)
        np.testing.assert_array_equal(s.images, x)
        assert s.names == ["000000", "000001", "000002", "000003"]
    np.save(tmp_path / "float.npy", x.astype(np.float32))
    with pytest.raises(InputError, match="uint8"):
        scoring.load_images(tmp_path / "float.npy")


def test_load_dataset_split_with_af(tiny_dataset):
    s = scoring.load_images(tiny_dataset, split="test")
    assert s.images.shape == (12, 3, 32, 32) and s.names[0] == "s6_000000"
    raw = s.af([0, 7])
    assert raw.shape == (2, 4, 32, 32) and raw.dtype == np.uint16
    af = s.af_norm([0, 7])
    assert af.shape == (2, 4, 32, 32) and af.min() >= -1 and af.max() <= 1
    sub = s.take([7, 0])
    np.testing.assert_array_equal(sub.af_norm([0]), af[1:])
    with pytest.raises(InputError, match="split"):
        scoring.load_images(tiny_dataset, split="nope")


def test_bad_image_sets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image tiles"):
        scoring.load_images(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        scoring.load_images(tmp_path / "missing")
    write_pngs(tmp_path / "mixed", he_like_tiles(1, size=16), ["a"])
    write_pngs(tmp_path / "mixed", he_like_tiles(1, size=20), ["b"])
    with pytest.raises(InputError, match="one size") as e:
        scoring.load_images(tmp_path / "mixed")
    assert "b.png" in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="cannot read image") as e:
        scoring.load_images(tmp_path / "bad")
    assert "x.png" in str(e.value) and "\n" not in str(e.value)


def test_load_converts_modes_as_pytorch_fid(tmp_path):
    # Real files of every PIL mode pytorch-fid meets; each is read back through
    # Image.open(...).convert("RGB") and checked against known pixel values.
    d = tmp_path / "modes"
    d.mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, "L").save(d / "a_grey.png")
    Image.fromarray(grey[..., None].repeat(2, 2) | np.array([0, 255], np.uint8), "LA").save(d / "b_la.png")
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 5).astype(np.uint16)  # 0..315
    Image.fromarray(wide).save(d / "c_i16.png")
    pal = Image.fromarray((np.arange(64).reshape(8, 8) % 3).astype(np.uint8), "P")
    pal.putpalette([200, 10, 30, 20, 150, 40, 5, 6, 250] + [0] * 759)
    pal.save(d / "d_pal.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 120, 230, np.arange(8, dtype=np.uint8)[:, None] * 30
    Image.fromarray(rgba, "RGBA").save(d / "e_rgba.png")
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:, :4] = (255, 0, 0, 0)   # pure cyan -> RGB (0, 255, 255)
    cmyk[:, 4:] = (0, 0, 0, 128)   # 50 % black -> grey 127
    Image.fromarray(cmyk, "CMYK").save(d / "f_cmyk.jpg", quality=100, subsampling=0)
    p = NullProgress()
    s = scoring.load_images(d, progress=p)
    assert s.names == ["a_grey", "b_la", "c_i16", "d_pal", "e_rgba", "f_cmyk"]
    assert s.images.dtype == np.uint8 and s.images.shape == (6, 3, 8, 8)
    np.testing.assert_array_equal(s.images[0], np.stack([grey] * 3))
    np.testing.assert_array_equal(s.images[1], np.stack([grey] * 3))  # alpha dropped
    np.testing.assert_array_equal(s.images[2], np.stack([np.minimum(wide, 255)] * 3))  # PIL clips at 255
    colours = np.array([[200, 10, 30], [20, 150, 40], [5, 6, 250]], np.uint8)
    np.testing.assert_array_equal(s.images[3].transpose(1, 2, 0), colours[np.arange(64).reshape(8, 8) % 3])
    blue = np.array([10, 120, 230], np.uint8)[:, None, None]
    np.testing.assert_array_equal(s.images[4], np.broadcast_to(blue, (3, 8, 8)))
    cmyk_rgb = s.images[5].astype(int)
    assert np.abs(cmyk_rgb[:, :, :4] - np.array([0, 255, 255])[:, None, None]).max() <= 3
    assert np.abs(cmyk_rgb[:, :, 4:] - 127).max() <= 3
    for i, f in enumerate(sorted(d.iterdir())):  # bit-identical to pytorch-fid's reader
        np.testing.assert_array_equal(s.images[i], np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1))
    assert len(p.warnings) == 1 and "1 tiles" in p.warnings[0] and "clips" in p.warnings[0]


def test_load_tiff_fallback_and_unconvertible(tmp_path):
    import tifffile

    x = he_like_tiles(1, size=16)[0]
    (tmp_path / "t").mkdir()
    tifffile.imwrite(tmp_path / "t" / "planar.tif", x, photometric="rgb", planarconfig="separate")  # Pillow cannot
    np.testing.assert_array_equal(scoring.load_images(tmp_path / "t").images[0], x)
    (tmp_path / "f").mkdir()
    tifffile.imwrite(tmp_path / "f" / "float.tif", x.transpose(1, 2, 0).astype(np.float32), photometric="rgb")
    with pytest.raises(InputError, match="no RGB conversion for a float32 TIFF") as e:
        scoring.load_images(tmp_path / "f")
    assert "float.tif" in str(e.value) and "\n" not in str(e.value)


def _set(images, names, src="x"):
    return scoring.ImageSet(images, names, src)


def test_pairing_by_name_partial_and_size():
    x = he_like_tiles(3, size=16)
    real = _set(x, ["a", "b", "c"], "real")
    fake, ok = scoring.pair_with_real(real, _set(x[[2, 0, 1]], ["c", "a", "b"]))
    assert ok and fake.names == ["a", "b", "c"]
    np.testing.assert_array_equal(fake.images, x)
    with pytest.raises(InputError, match="no fake tile for real tile 'c'"):
        scoring.pair_with_real(real, _set(x[:2], ["a", "b"], "fake"))
    with pytest.raises(InputError, match="16x16"):
        scoring.pair_with_real(real, _set(he_like_tiles(3, size=8), ["a", "b", "c"]))
    p = NullProgress()
    _, ok = scoring.pair_with_real(real, _set(x, ["p", "q", "r"]), p)
    assert ok and "sorted order" in p.warnings[0]
    _, ok = scoring.pair_with_real(real, _set(x[:2], ["p", "q"]), p)
    assert not ok and "unpaired" in p.warnings[1]


def test_select_tiles_is_seeded_subset():
    a = scoring.select_tiles(100, 10, seed=3)
    assert len(a) == 10 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, scoring.select_tiles(100, 10, seed=3))
    np.testing.assert_array_equal(scoring.select_tiles(5, None, 0), np.arange(5))


def test_score_image_sets_identity_noise_and_unpaired():
    real = he_like_tiles(40, size=32, seed=1)
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 12, real.shape), 0, 255).astype(np.uint8)
    other = he_like_tiles(36, size=32, seed=5)
    res = scoring.score_image_sets(
        real,
        {"copy": real.copy(), "noisy": noisy, "other": other},
        {"FSD": simple_features},
        n_boot=200,
        fd_boot=20,
        seed=0,
    )
    copy, nz, ot = (res["models"][k] for k in ("copy", "noisy", "other"))
    assert copy["paired"] and nz["paired"] and not ot["paired"]
    assert copy["metrics"]["FSD"]["value"] < 1e-8
    assert copy["metrics"]["L1"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert copy["metrics"]["SSIM"]["value"] == pytest.approx(1.0)
    m = nz["metrics"]
    assert m["FSD"]["value"] > 1.0
    for fd in (m["FSD"], ot["metrics"]["FSD"]):  # subsampling intervals contain the estimate
        assert 0 <= fd["lo"] < fd["value"] < fd["hi"]
    assert "subsampling" in res["settings"]["fd_interval"]
    assert m["L1"]["lo"] <= m["L1"]["value"] <= m["L1"]["hi"]
    assert 8 < m["L1"]["value"] < m["L2"]["value"] < 13  # N(0, 12) noise, clipped and rounded
    assert 25 < m["PSNR"]["value"] < 30
    assert set(ot["metrics"]) == {"FSD"}
    assert res["per_image"]["noisy"]["L1"].shape == (40,)
    assert any("PSNR = inf" in w for w in res["warnings"])
    assert not any("use at least" in w for w in res["warnings"])  # 36 tiles > 33 dims
    js = scoring.json_ready(res)
    assert "per_image" not in js and js["models"]["copy"]["metrics"]["PSNR"]["value"] is None


def test_score_warns_when_fewer_tiles_than_feature_dims():
    real = he_like_tiles(12, size=16, seed=1)
    res = scoring.score_image_sets(real, {"m": real[::-1].copy()}, {"FID": simple_features}, n_boot=50, fd_boot=10)
    assert any("FID" in w and "use at least 34 tiles" in w for w in res["warnings"])


def test_feature_nan_is_input_error():
    real = he_like_tiles(4, size=16)
    with pytest.raises(InputError, match="NaN"):
        scoring.score_image_sets(real, {"m": real}, {"FSD": lambda b: np.full((len(b), 3), np.nan)})


def test_write_report_self_contained(tmp_path):
    real = he_like_tiles(6, size=32, seed=1)
    fake = np.clip(real.astype(int) + 15, 0, 255).astype(np.uint8)
    res = scoring.score_image_sets(real, {"A": fake, "B": real[::-1].copy()}, {"FSD": simple_features}, n_boot=50, fd_boot=10)
    af = np.random.default_rng(0).uniform(-1, 1, (6, 8, 32, 32)).astype(np.float32)
    from vstain_cli.io.images import af_false_colour

    grids = {"AF (false colour)": af_false_colour(af), "target H&E": real, "A": fake, "B": real[::-1]}
    unc = {"input": af_false_colour(af), "lower": fake, "upper": real, "width": np.random.rand(6, 32, 32)}
    out = scoring.write_report(tmp_path / "report.html", res, grids, unc, row_names=[f"t{i}" for i in range(6)])
    text = out.read_text()
    imgs = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', text)
    assert len(imgs) >= 6 * 4 + 6 * 4
    for col in ("FID", "FSD", "L1", "L2", "PSNR", "SSIM"):
        assert col in text or col == "FID"
    assert "Uncertainty" in text and "Examples" in text and 'class="best"' in text
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from the network
    assert not list(tmp_path.glob(".*partial*"))


def test_fd_interval_needs_three_tiles():
    real = he_like_tiles(3, size=16, seed=1)
    kw = dict(feature_extractors={"FSD": simple_features}, n_boot=20, fd_boot=10)
    fd = scoring.score_image_sets(real, {"a": he_like_tiles(3, size=16, seed=2)}, **kw)["models"]["a"]["metrics"]["FSD"]
    assert fd["lo"] <= fd["value"] <= fd["hi"]
    res = scoring.score_image_sets(real[:2], {"a": he_like_tiles(2, size=16, seed=2)}, **kw)
    fd = res["models"]["a"]["metrics"]["FSD"]
    assert fd["value"] > 0 and np.isnan(fd["lo"]) and np.isnan(fd["hi"])
    assert any("at least 3 tiles" in w for w in res["warnings"])


def test_fd_needs_two_tiles_and_uint8():
    real = he_like_tiles(3, size=16)
    with pytest.raises(InputError, match="at least 2 tiles"):
        scoring.score_image_sets(real, {"m": real[:1]}, {"FSD": simple_features})
    with pytest.raises(InputError, match="uint8"):
        scoring.score_image_sets(real, {"m": real.astype(np.float32)})
