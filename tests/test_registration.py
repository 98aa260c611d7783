"""Registration core: the transform, phase-correlation shifts, estimation against phantom truth, patch checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vstain_cli.data.register_pairs import load_registration, register_pairs
from vstain_cli.data.registration import (
    RegisterOptions,
    Registration,
    alignment_check,
    estimate,
    fit_affine,
    he_view,
    patch_residual,
    quality,
    shift_of,
)
from vstain_cli.data.synth.misregister import Misregistration, misregister_pairs, random_transform
from vstain_cli.data.synth.render import synth
from vstain_cli.data.tiling import TileOptions, tile
from vstain_cli.data.warp import Transform, read_registered, transform_from_dict, transform_to_dict
from vstain_cli.errors import InputError
from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.io.slides import open_af, open_he
from vstain_cli.io.tiff import write_pyramid

MPP = 0.5


def _blobs(shape=(128, 128), seed=0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.random.default_rng(seed).random(shape), 2.0).astype(np.float32)


def test_transform_inverse_and_dict_roundtrip():
    t, _ = random_transform(1000, 800, MPP, Misregistration(), seed=3)
    x, y = np.meshgrid(np.linspace(0, 999, 7), np.linspace(0, 799, 5))
    u, v = t.map(x, y)
    xb, yb = t.inverse_map(u, v)
    assert np.abs(xb - x).max() < 1e-3 and np.abs(yb - y).max() < 1e-3
    assert t.max_displacement() * MPP == pytest.approx(20.0, rel=1e-6)
    t2 = transform_from_dict(json.loads(json.dumps(transform_to_dict(t))))
    assert np.abs(np.array(t2.map(x, y)) - np.array(t.map(x, y))).max() < 1e-2


def test_scaled_transform_matches_level0_on_block_means():
    t = Transform(np.array([[1.02, 0.05, 30.0], [-0.05, 0.98, -12.0]]))
    ts = t.scaled(8, 4)
    # view pixel i of a block-mean view with downsample ds is centred on level-0 i * ds + (ds - 1) / 2
    u, v = ts.map(np.array([3.0]), np.array([5.0]))
    u0, v0 = t.map(np.array([3 * 8 + 3.5]), np.array([5 * 8 + 3.5]))
    assert u[0] == pytest.approx((u0[0] - 1.5) / 4) and v[0] == pytest.approx((v0[0] - 1.5) / 4)


def test_transform_rejects_bad_input():
    with pytest.raises(ValueError):
        Transform(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        Transform(np.eye(2, 3), dx=np.zeros((2, 2)))


def test_shift_of_sign_and_subpixel():
    img = _blobs((160, 160))
    ref = img[16:144, 16:144]
    mov = img[16 - 5 : 144 - 5, 16 + 3 : 144 + 3]  # mov(p) = img(p + (-5, 3)) -> ref(p) = mov(p - (-5, 3))
    s, conf = shift_of(ref, mov, upsample=10)
    assert s == pytest.approx([-5, 3], abs=0.15) and conf > 0.95


def test_fit_affine_recovers_exact_affine():
    a = np.array([[1.01, 0.03, 5.0], [-0.02, 0.99, -7.0]])
    src = np.random.default_rng(0).uniform(0, 500, (20, 2))
    dst = src @ a[:, :2].T + a[:, 2]
    np.testing.assert_allclose(fit_affine(src, dst, np.ones(20)), a, atol=1e-9)


def test_he_view_is_eosin_density():
    pink = np.array([[[240, 150, 220]]], np.uint8)  # eosin-rich
    blue = np.array([[[90, 80, 170]]], np.uint8)  # hematoxylin-rich
    glass = np.array([[[250, 250, 250]]], np.uint8)
    assert he_view(pink)[0, 0] > he_view(glass)[0, 0] + 0.05
    assert he_view(pink)[0, 0] > he_view(blue)[0, 0]


@pytest.fixture(scope="module")
def misregistered(tmp_path_factory):
    """One 1024^2 phantom pair, clean and moved by a known transform within small limits."""
    root = tmp_path_factory.mktemp("reg")
    clean = synth(root / "clean", 1, (1024, 1024), 3, MPP, seed=5)
    mis = synth(root / "mis", 1, (1024, 1024), 3, MPP, seed=5)
    misregister_pairs(mis, Misregistration(rotation_deg=4, shift_um=40, warp_um=8, warp_wavelength_um=500),
                      seed=2, mpp=MPP)
    return root, clean, mis


def _tissue_points(af_path):
    with open_af(af_path) as af:
        thumb, ds = af.thumbnail(128, channel_sum=True)
        mask = tissue_mask_af(thumb, channels=af.channels)
    yy, xx = np.nonzero(mask)
    return xx * ds + (ds - 1) / 2, yy * ds + (ds - 1) / 2


def test_estimate_recovers_truth(misregistered):
    root, _, mis = misregistered
    truth = load_registration(root / "mis" / "phantom-000.he.truth.json")
    with open_af(root / "mis" / "phantom-000.af.ome.tif") as af, open_he(root / "mis" / "phantom-000.he.tif") as he:
        reg = estimate(af, he, MPP, MPP)
    w, h = json.loads((root / "mis" / "phantom-000.he.truth.json").read_text())["he_size"]
    assert w == h > 1024  # the H&E canvas holds all of the moved section
    x, y = _tissue_points(root / "mis" / "phantom-000.af.ome.tif")
    ut, vt = truth.map(x, y)
    assert ((ut >= 0) & (vt >= 0) & (ut <= w - 1) & (vt <= h - 1)).all()
    ue, ve = reg.transform.map(x, y)
    err = np.hypot(ue - ut, ve - vt) * MPP
    margin = (w - 1024) / 2
    no_reg = np.hypot(x + margin - ut, y + margin - vt) * MPP  # the canvas margin alone is no misregistration
    assert np.median(no_reg) > 20  # the phantom really is misregistered
    assert np.median(err) < 2.0 and np.percentile(err, 95) < 5.0, (np.median(err), np.percentile(err, 95))
    assert reg.valid.sum() >= 10 and reg.confidence.max() > 0.5


def test_read_registered_undoes_the_move(misregistered):
    root, _, _ = misregistered
    truth = load_registration(root / "mis" / "phantom-000.he.truth.json")
    with open_he(root / "clean" / "phantom-000.he.tif") as clean, open_he(root / "mis" / "phantom-000.he.tif") as he:
        ref = clean.read_region(448, 448, 128, 128).astype(np.float32)
        back = read_registered(he, truth, 448, 448, 128, 128).astype(np.float32)
        raw = he.read_region(448, 448, 128, 128).astype(np.float32)
    assert np.corrcoef(ref.ravel(), back.ravel())[0, 1] > 0.9 > np.corrcoef(ref.ravel(), raw.ravel())[0, 1] + 0.3


def test_patch_check_flags_shifted_patches(misregistered):
    root, clean, _ = misregistered
    xy = [(x, y) for x in range(256, 768, 128) for y in range(256, 768, 128)]
    with open_af(root / "clean" / "phantom-000.af.ome.tif") as af, open_he(root / "clean" / "phantom-000.he.tif") as he:
        r0 = np.array([patch_residual(af.read_region(x, y, 128, 128), he.read_region(x, y, 128, 128)) for x, y in xy])
        r1 = np.array([patch_residual(af.read_region(x, y, 128, 128), he.read_region(x + 8, y - 6, 128, 128))
                       for x, y in xy])  # H&E 10 px = 5 µm off
        assert np.median(r0[:, 0]) < 1.0 and np.median(r0[:, 1]) > 0.5
        assert np.median(r1[:, 0]) == pytest.approx(10.0, abs=1.0) and np.median(r1[:, 2]) > 0.1
        ident = Transform.identity()
        off = Transform(np.array([[1.0, 0, 8], [0, 1.0, -6]]))
        keep0, info0, warn0 = alignment_check(af, he, ident, xy, 128, MPP, 3.0)
        keep1, info1, _ = alignment_check(af, he, off, xy, 128, MPP, 3.0)
        _, info_s, warn_s = alignment_check(af, he, None, xy, 128, MPP, 3.0)
    assert keep0.all() and warn0 is None and info0["dropped"] == 0
    assert info1["dropped"] >= len(xy) // 2 and (~keep1).sum() == info1["dropped"]
    assert not info_s["registered"] and warn_s is None and info_s["median_shift_um"] < 1.0


def test_register_then_tile_keeps_aligned_patches(misregistered, tmp_path):
    root, clean, mis = misregistered
    result = register_pairs(mis, tmp_path / "registered")
    assert result.passed == ["phantom-000"] and not result.failed
    reg_csv = result.pairs_csv
    text = reg_csv.read_text().splitlines()
    assert text[0].endswith(",registration") and text[1].endswith("phantom-000.registration.json")
    assert (tmp_path / "registered" / "phantom-000.registration.png").stat().st_size > 1000
    opts = TileOptions(size=64, stride=64, min_tissue=0.5)
    s_clean = tile(clean, tmp_path / "ds-clean", opts)
    s_reg = tile(reg_csv, tmp_path / "ds-reg", opts)
    rec = json.loads((tmp_path / "ds-reg" / "dataset.json").read_text())["slides"]["phantom-000"]["alignment"]
    assert rec["registered"] and rec["measured"] >= s_reg.slides[0].patches
    assert s_reg.slides[0].patches >= 0.95 * s_clean.slides[0].patches  # no tissue is lost off the H&E canvas
    # a patch of the registered dataset matches the clean H&E at the same place
    he = np.load(tmp_path / "ds-reg" / "slides" / "phantom-000" / "he.npy")
    x, y = s_reg.slides[0].xy[len(he) // 2]
    with open_he(root / "clean" / "phantom-000.he.tif") as h:
        ref = h.read_region(x, y, 64, 64).transpose(2, 0, 1).astype(np.float32)
    assert np.corrcoef(ref.ravel(), he[len(he) // 2].astype(np.float32).ravel())[0, 1] > 0.8


def test_register_refuses_existing_output_and_bad_registration(misregistered, tmp_path):
    root, _, mis = misregistered
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pairs.csv").write_text("x")
    from vstain_cli.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        register_pairs(mis, tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="vstain-registration"):
        load_registration(bad)
    with pytest.raises(InputError, match="not found"):
        load_registration(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        RegisterOptions(max_rotation=90).check()


def scrambled_he(src, dst, cell: int = 64, seed: int = 0):
    """``src`` H&E with its ``cell``-px squares shuffled: the same stain statistics, almost no matching place."""
    with open_he(src) as he:
        img = he.read_region(0, 0, he.width, he.height)
    h, w = (img.shape[0] // cell) * cell, (img.shape[1] // cell) * cell
    cells = img[:h, :w].reshape(h // cell, cell, w // cell, cell, 3).swapaxes(1, 2).reshape(-1, cell, cell, 3)
    cells = cells[np.random.default_rng(seed).permutation(len(cells))]
    out = img.copy()
    out[:h, :w] = cells.reshape(h // cell, w // cell, cell, cell, 3).swapaxes(1, 2).reshape(h, w, 3)
    write_pyramid(dst, iter([out]), img.shape[1], img.shape[0], 3, np.uint8, mpp=MPP, compression="zlib")
    return dst


def _reg(affine, valid=40, tissue=50, shift=0.2) -> Registration:
    stats = {"blocks_valid": valid, "blocks_tissue": tissue, "pass2_shift_um_median": shift}
    return Registration(Transform(np.asarray(affine, float)), np.zeros((1, 1)), np.ones((1, 1), bool), MPP, stats)


def test_fill_with_a_single_valid_node_ends():
    """A lone matched block on a large grid (a failed registration) fills the grid with its value, and ends
    (the normalised convolution's density never reaches its threshold: sigma used to grow without bound)."""
    from vstain_cli.data.registration import _fill

    values, valid = np.zeros((48, 48)), np.zeros((48, 48), bool)
    values[3, 40], valid[3, 40] = 7.0, True
    out = _fill(values, valid)
    assert np.allclose(out, 7.0)


def test_quality_bar_reasons():
    o = RegisterOptions()
    c, s = np.cos(np.deg2rad(3.0)), np.sin(np.deg2rad(3.0))
    good = quality(_reg([[c, -s, 3.0], [s, c, -4.0]]), o, 1.0)
    assert good["passed"] and not good["reasons"] and good["rotation_deg"] == pytest.approx(3.0, abs=0.01)
    assert good["matched"] == 0.8 and good["scale"] == pytest.approx([1.0, 1.0], abs=1e-3)
    few = quality(_reg(np.eye(2, 3), valid=2, tissue=53, shift=15.0), o, 1.0)
    assert not few["passed"] and few["reasons"][0].startswith("only 2 of 53 tissue blocks matched")
    assert "not converged" in few["reasons"][1]
    assert "only 9 of 20" in quality(_reg(np.eye(2, 3), valid=9, tissue=20), o, 1.0)["reasons"][0]  # < min_blocks
    assert "only 12 of 60" in quality(_reg(np.eye(2, 3), valid=12, tissue=60), o, 1.0)["reasons"][0]  # < 25 %
    mirror = quality(_reg([[-1.0, 0, 0], [0, 1.0, 0]]), o, 1.0)
    assert mirror["mirrored"] and mirror["reasons"] == ["the affine mirrors the section"]
    assert "rotation 30.0°" in quality(_reg([[0.866, -0.5, 0], [0.5, 0.866, 0]]), o, 1.0)["reasons"][0]
    assert "implausible scale" in quality(_reg([[1.3, 0, 0], [0, 1.0, 0]]), o, 1.0)["reasons"][0]
    # the scale is judged against the pixel-size ratio: an H&E at half the AF's µm/px maps 1 AF px to 2 H&E px
    assert quality(_reg([[2.0, 0, 0], [0, 2.0, 0]]), o, 2.0)["passed"]
    with pytest.raises(ValueError, match="--min-blocks"):
        RegisterOptions(min_blocks=2).check()


def test_misregistered_pair_fails_the_bar_and_is_kept_out(misregistered, tmp_path):
    """A scrambled H&E (a few blocks match by chance) fails; the good pair still passes; tile refuses the failed."""
    root, _, mis = misregistered
    scrambled_he(root / "mis" / "phantom-000.he.tif", tmp_path / "scrambled.he.tif")
    af = root / "mis" / "phantom-000.af.ome.tif"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"slide_id,af,he,label\ngood,{af},{root / 'mis' / 'phantom-000.he.tif'},0\n"
                     f"bad,{af},scrambled.he.tif,1\n")
    result = register_pairs(pairs, tmp_path / "reg")
    assert result.passed == ["good"] and list(result.failed) == ["bad"]
    assert "scrambled.he.tif: registration failed: only " in result.failed["bad"]
    rows = result.pairs_csv.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("good,") and "bad" not in result.pairs_csv.read_text()
    q_bad = json.loads((tmp_path / "reg" / "bad.registration.json").read_text())["quality"]
    q_good = json.loads((tmp_path / "reg" / "good.registration.json").read_text())["quality"]
    assert not q_bad["passed"] and q_bad["blocks_valid"] < 10 and q_bad["matched"] < 0.25, q_bad
    assert q_good["passed"] and q_good["matched"] > 0.8 and q_good["pass2_shift_um_median"] < 0.5, q_good
    assert (tmp_path / "reg" / "bad.registration.png").exists()  # kept for inspection
    with pytest.raises(InputError, match="failed the quality bar"):
        load_registration(tmp_path / "reg" / "bad.registration.json")
    # a pairs.csv that names the failed registration anyway: tile refuses it
    (tmp_path / "reg" / "by-hand.csv").write_text(
        f"slide_id,af,he,label,registration\nbad,{af},{tmp_path / 'scrambled.he.tif'},1,bad.registration.json\n")
    with pytest.raises(InputError, match="bad.registration.json: this registration failed the quality bar"):
        tile(tmp_path / "reg" / "by-hand.csv", tmp_path / "ds", TileOptions(size=64, stride=64))
    # only the failed pair: InputError naming the H&E file, and no pairs.csv
    (tmp_path / "bad.csv").write_text(f"slide_id,af,he,label\nbad,{af},scrambled.he.tif,1\n")
    with pytest.raises(InputError, match="scrambled.he.tif: registration failed: only") as e:
        register_pairs(tmp_path / "bad.csv", tmp_path / "reg-bad")
    assert "\n" not in str(e.value) and not (tmp_path / "reg-bad" / "pairs.csv").exists()
