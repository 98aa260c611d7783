"""``vstain synth --misregister`` -> ``vstain register`` -> ``vstain tile`` as real subprocesses, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_error_line, run_cli

from vstain_cli.data.register_pairs import load_registration
from vstain_cli.data.warp import read_registered
from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.io.slides import open_af, open_he
from vstain_cli.io.tiff import read_provenance, write_pyramid


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("regcli")
    proc = run_cli("synth", str(root / "mis"), "--slides", "1", "--size", "1024", "1024", "--channels", "3",
                   "--seed", "4", "--misregister")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("register", str(root / "mis" / "pairs.csv"), "--out", str(root / "reg"))
    assert proc.returncode == 0, proc.stderr
    return root, root / "reg" / "pairs.csv"


def test_misregister_records_truth(registered):
    root, _ = registered
    truth = json.loads((root / "mis" / "phantom-000.he.truth.json").read_text())
    p = truth["misregister"]
    assert 2.5 <= abs(p["rotation_deg"]) <= 5.0 and 100 <= np.hypot(*p["shift_um"]) <= 200
    assert p["warp_um_max"] == pytest.approx(20.0, rel=1e-3)
    assert read_provenance(root / "mis" / "phantom-000.he.tif")["misregister"]["rotation_deg"] == p["rotation_deg"]


def test_register_recovers_truth_and_writes_outputs(registered):
    root, reg_csv = registered
    lines = reg_csv.read_text().splitlines()
    assert lines[0] == "slide_id,af,he,label,registration"
    assert lines[1] == "phantom-000,../mis/phantom-000.af.ome.tif,../mis/phantom-000.he.tif,0,phantom-000.registration.json"
    assert (root / "reg" / "phantom-000.registration.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((root / "reg" / "phantom-000.registration.json").read_text())
    assert rec["format"] == "vstain-registration" and rec["stats"]["blocks_valid"] >= 10
    assert "register" in rec["command"] and rec["af"]["name"] == "phantom-000.af.ome.tif"
    est = load_registration(root / "reg" / "phantom-000.registration.json")
    truth = load_registration(root / "mis" / "phantom-000.he.truth.json")
    with open_af(root / "mis" / "phantom-000.af.ome.tif") as af:
        thumb, ds = af.thumbnail(128, channel_sum=True)
        mask = tissue_mask_af(thumb, channels=af.channels)
    yy, xx = np.nonzero(mask)
    x, y = xx * ds + (ds - 1) / 2, yy * ds + (ds - 1) / 2
    ut, vt = truth.map(x, y)
    ue, ve = est.map(x, y)
    err = np.hypot(ue - ut, ve - vt) * 0.5
    assert len(err) > 100 and np.median(err) < 2.0 and np.percentile(err, 95) < 5.0


def test_tile_reads_through_registration_and_warns_without(registered, tmp_path):
    root, reg_csv = registered
    proc = run_cli("tile", str(reg_csv), "--out", str(tmp_path / "ds"), "--size", "64", "--stride", "64",
                   "--max-shift", "3")
    assert proc.returncode == 0, proc.stderr
    assert "misaligned patches (> 3 µm) dropped: phantom-000" in proc.stderr
    slide = json.loads((tmp_path / "ds" / "dataset.json").read_text())["slides"]["phantom-000"]
    assert slide["alignment"]["registered"] and slide["patches"] > 20
    assert slide["alignment"]["median_shift_um"] < 1.5
    # the misregistered H&E is on a larger canvas: tiling it unregistered is refused, pointing at register
    assert_one_error_line(run_cli("tile", str(root / "mis" / "pairs.csv"), "--out", str(tmp_path / "ds-raw")),
                          "phantom-000.he.tif", "vstain register")
    # an H&E on the AF's grid but 8 µm off: tile measures a sample of patches and warns
    truth = load_registration(root / "mis" / "phantom-000.he.truth.json")
    off = truth.with_affine(truth.affine + np.array([[0, 0, 16.0], [0, 0, 0]]))
    with open_he(root / "mis" / "phantom-000.he.tif") as he:
        img = read_registered(he, off, 0, 0, 1024, 1024)
    write_pyramid(tmp_path / "off.he.tif", iter([img]), 1024, 1024, 3, np.uint8, mpp=0.5, compression="zlib")
    (tmp_path / "pairs.csv").write_text(f"slide_id,af,he,label\noff,{root / 'mis' / 'phantom-000.af.ome.tif'},"
                                        "off.he.tif,0\n")
    proc = run_cli("tile", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "ds-off"), "--size", "64",
                   "--stride", "64")
    assert proc.returncode == 0, proc.stderr
    assert "look misaligned" in proc.stderr and "vstain register" in proc.stderr
    check = json.loads((tmp_path / "ds-off" / "dataset.json").read_text())["slides"]["off"]["alignment"]
    assert not check["registered"] and check["dropped"] == 0 and 6.0 < check["median_shift_um"] < 10.0


def test_bad_input_is_one_error_line(registered, tmp_path):
    root, reg_csv = registered
    assert_one_error_line(run_cli("register", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")),
                          "nope.csv", "not found")
    assert_one_error_line(run_cli("register", str(root / "mis" / "pairs.csv"), "--out", str(root / "reg")),
                          "--force")
    # a pairs.csv whose registration file is missing, or was made for another slide
    folder = root / "reg-copy"  # beside reg/, so the relative slide paths still resolve
    shutil.copytree(root / "reg", folder)
    (folder / "phantom-000.registration.json").unlink()
    assert_one_error_line(run_cli("tile", str(folder / "pairs.csv"), "--out", str(tmp_path / "d1")),
                          "phantom-000.registration.json", "not found")
    rec = json.loads((root / "reg" / "phantom-000.registration.json").read_text())
    rec["af"]["sha256_head_tail"] = "0" * 64
    (folder / "phantom-000.registration.json").write_text(json.dumps(rec))
    assert_one_error_line(run_cli("tile", str(folder / "pairs.csv"), "--out", str(tmp_path / "d2")),
                          "made for another AF slide")
    assert_one_error_line(run_cli("tile", str(reg_csv), "--out", str(tmp_path / "d3"), "--max-shift", "0"),
                          "--max-shift")


def test_failed_registration_is_named_kept_out_and_refused(registered, tmp_path):
    """A scrambled H&E fails the quality bar: alone -> one error line, exit 2; beside a good pair -> a warning
    naming it, a summary line, exit 0 (exit 2 with --strict), and tile refuses its registration.json."""
    from test_registration import scrambled_he

    root, _ = registered
    scrambled_he(root / "mis" / "phantom-000.he.tif", tmp_path / "scrambled.he.tif")
    af, good_he = root / "mis" / "phantom-000.af.ome.tif", root / "mis" / "phantom-000.he.tif"
    (tmp_path / "bad.csv").write_text(f"slide_id,af,he,label\nbad,{af},scrambled.he.tif,1\n")
    # --quiet: without it a log also gets the progress lines (stderr) before the error
    assert_one_error_line(run_cli("register", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "r1"), "--quiet"),
                          "scrambled.he.tif: registration failed: only", "tissue blocks matched",
                          "bad.registration.json")
    assert not (tmp_path / "r1" / "pairs.csv").exists()
    (tmp_path / "mixed.csv").write_text(f"slide_id,af,he,label\ngood,{af},{good_he},0\n"
                                        f"bad,{af},scrambled.he.tif,1\n")
    proc = run_cli("register", str(tmp_path / "mixed.csv"), "--out", str(tmp_path / "r2"))
    assert proc.returncode == 0, proc.stderr
    warns = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "scrambled.he.tif: registration failed" in warns[0], proc.stderr
    assert "kept out of pairs.csv" in warns[0]
    assert "registered 1 of 2 pairs into" in proc.stderr and "kept out of it: bad" in proc.stderr
    rows = (tmp_path / "r2" / "pairs.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["slide_id", "good"]
    rec = json.loads((tmp_path / "r2" / "bad.registration.json").read_text())
    assert rec["quality"]["passed"] is False and rec["quality"]["blocks_valid"] < 10
    proc = run_cli("register", str(tmp_path / "mixed.csv"), "--out", str(tmp_path / "r3"), "--strict")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    assert "--strict" in proc.stderr and (tmp_path / "r3" / "pairs.csv").exists()
    # a pairs.csv that names the failed registration anyway
    (tmp_path / "r2" / "by-hand.csv").write_text(
        f"slide_id,af,he,label,registration\nbad,{af},{tmp_path / 'scrambled.he.tif'},1,bad.registration.json\n")
    assert_one_error_line(run_cli("tile", str(tmp_path / "r2" / "by-hand.csv"), "--out", str(tmp_path / "ds"),
                                  "--quiet"),
                          "bad.registration.json", "failed the quality bar")
