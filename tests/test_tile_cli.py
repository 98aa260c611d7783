"""``vstain synth`` + ``vstain tile`` as real subprocesses, and every bad input."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_one_error_line, run_cli

from vstain_cli.io.tiff import write_pyramid


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def cli_pairs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "phantom"
    proc = run_cli("synth", str(folder), "--slides", "5", "--size", "384", "512", "--channels", "4", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 phantom pairs" in proc.stderr
    return folder / "pairs.csv"


def test_synth_then_tile_end_to_end(cli_pairs, tmp_path):
    before = _digest(cli_pairs.parent)
    out = tmp_path / "ds"
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "64", "--stride", "64", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "label 0" in proc.stdout  # the summary table
    assert (out / "dataset.json").exists() and (out / "index.csv").exists()
    # rerun resumes: every slide already done
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "64", "--stride", "64")
    assert proc.returncode == 0 and "5 slides already done" in proc.stderr
    assert _digest(cli_pairs.parent) == before, "inputs were modified"


@pytest.mark.slow
def test_killed_tile_resumes(cli_pairs, tmp_path):
    """kill -9 in the middle of a slide, rerun: the same dataset as an uninterrupted run."""
    import signal
    import sys
    import time

    ref = tmp_path / "ref"
    assert run_cli("tile", str(cli_pairs), "--out", str(ref), "--size", "32", "--stride", "32").returncode == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    slow_tile = (  # the real CLI, with each slide's reading slowed so the kill lands mid-run
        "import time, vstain_cli.data.tiling as t\n"
        "real = t._read_rows\n"
        "def slow(*a, **k):\n    time.sleep(0.4)\n    return real(*a, **k)\n"
        "t._read_rows = slow\n"
        "from vstain_cli.cli.main import run\nrun()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow_tile, "tile", str(cli_pairs), "--out", str(out),
                             "--size", "32", "--stride", "32", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len([p for p in (out / "slides").glob("phantom-*")]) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.name for p in (out / "slides").glob("phantom-*")]
    assert 1 <= len(done) < 5 and not (out / "dataset.json").exists()
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "32", "--stride", "32")
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.csv").read_text() == (ref / "index.csv").read_text()
    for sid in (p.name for p in (ref / "slides").iterdir()):
        assert _digest(out / "slides" / sid).get("af.npy") == _digest(ref / "slides" / sid)["af.npy"]
    assert not list((out / "slides").glob(".*partial*"))


def _pairs_csv(folder: Path, rows: list[str], header: str = "slide_id,af,he,label") -> Path:
    p = folder / "pairs.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def test_bad_inputs_give_one_line_and_exit_2(cli_pairs, tmp_path):
    src = cli_pairs.parent
    af0, he0 = src / "phantom-000.af.ome.tif", src / "phantom-000.he.tif"
    af1, he1 = src / "phantom-001.af.ome.tif", src / "phantom-001.he.tif"
    out = tmp_path / "out"
    cases: list[tuple[Path, tuple[str, ...]]] = []

    d = tmp_path / "missing"
    d.mkdir()
    cases.append((_pairs_csv(d, [f"a,{d / 'nope.tif'},{he0},1"]), ("nope.tif", "file not found")))
    d = tmp_path / "notiff"
    d.mkdir()
    (d / "af.tif").write_text("hello, I am a text file")
    cases.append((_pairs_csv(d, [f"a,af.tif,{he0},1"]), ("af.tif", "not a readable TIFF")))
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "af.tif").write_bytes(af0.read_bytes()[: af0.stat().st_size // 3])
    cases.append((_pairs_csv(d, [f"a,af.tif,{he0},1"]), ("af.tif", "truncated")))
    d = tmp_path / "channels"
    d.mkdir()
    import tifffile

    tifffile.imwrite(d / "af3.tif", np.zeros((384, 512, 3), np.uint16), photometric="minisblack",
                     planarconfig="contig", tile=(128, 128))
    cases.append((_pairs_csv(d, [f"a,{af0},{he0},1", f"b,af3.tif,{he1},1"]), ("af3.tif", "3 channels")))
    d = tmp_path / "size"
    d.mkdir()
    tifffile.imwrite(d / "small.tif", np.zeros((200, 512, 4), np.uint16), photometric="minisblack",
                     planarconfig="contig", tile=(128, 128))
    cases.append((_pairs_csv(d, [f"a,small.tif,{he0},1"]), ("small.tif", "co-registered")))
    d = tmp_path / "empty"
    d.mkdir()
    (d / "pairs.csv").write_text("")
    cases.append((d / "pairs.csv", ("pairs.csv", "empty")))
    d = tmp_path / "malformed"
    d.mkdir()
    cases.append((_pairs_csv(d, ["a,b"], header="slide,file"), ("pairs.csv", "missing column")))
    d = tmp_path / "dup"
    d.mkdir()
    cases.append((_pairs_csv(d, [f"a,{af0},{he0},1", f"a,{af1},{he1},2"]), ("pairs.csv", "duplicate slide_id")))
    d = tmp_path / "label"
    d.mkdir()
    cases.append((_pairs_csv(d, [f"a,{af0},{he0},9"]), ("pairs.csv", "label 9 out of range")))

    before = _digest(src)
    for csv, needles in cases:
        proc = run_cli("tile", str(csv), "--out", str(out))
        assert_one_error_line(proc, *needles)
        assert not out.exists(), f"output written for {csv}"
    assert _digest(src) == before


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "tile", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_slide_without_tissue_is_skipped_with_a_warning(cli_pairs, tmp_path):
    src = cli_pairs.parent
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(243, 2, (384, 512, 3)), 0, 255).astype(np.uint8)
    write_pyramid(tmp_path / "glass.tif", iter([glass]), 384, 512, 3, mpp=0.5, compression="zlib")
    csv = _pairs_csv(tmp_path, [f"{p},{src / (p + '.af.ome.tif')},{src / (p + '.he.tif')},{i % 4}"
                                for i, p in enumerate(f"phantom-{k:03d}" for k in range(4))]
                     + [f"empty,{src / 'phantom-004.af.ome.tif'},glass.tif,0"])
    proc = run_cli("tile", str(csv), "--out", str(tmp_path / "ds"), "--size", "64", "--stride", "64")
    assert proc.returncode == 0, proc.stderr
    assert "glass.tif: no tissue found; slide skipped" in proc.stderr
    assert "1 slides skipped (see the warnings)" in proc.stderr


def test_existing_output_resumes_or_needs_force(cli_pairs, tmp_path):
    out = tmp_path / "ds"
    assert run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "64", "--stride", "64").returncode == 0
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "32", "--stride", "32")
    assert_one_error_line(proc, str(out), "--force")
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "32", "--stride", "32", "--force")
    assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def _read_only_folder(path: Path):
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot mount a read-only folder")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def test_read_only_output_folder(cli_pairs, tmp_path):
    with _read_only_folder(tmp_path / "ro") as ro:
        proc = run_cli("tile", str(cli_pairs), "--out", str(ro / "ds"))
        assert_one_error_line(proc, str(ro / "ds"))
        proc = run_cli("synth", str(ro), "--slides", "1", "--size", "64", "64")
        assert_one_error_line(proc, str(ro), "not writable")


def test_synth_refuses_to_overwrite(cli_pairs):
    proc = run_cli("synth", str(cli_pairs.parent), "--slides", "1", "--size", "64", "64")
    assert_one_error_line(proc, "pairs.csv", "--force")


def test_help_and_version_are_fast():
    import sys
    import time

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vstain_cli", "--version"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.startswith("vstain ")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vstain_cli", "--help"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and "tile" in proc.stdout
    heavy = [ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith((" torch", " openslide", " tifffile", " skimage"))]
    assert not heavy, f"heavy imports on the --help path: {heavy}"
    del t


def test_patch_larger_than_every_slide_is_named_and_leaves_nothing(cli_pairs, tmp_path):
    out = tmp_path / "dataset2"
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "2048")
    assert_one_error_line(proc, "--size 2048 is larger than every slide", "512x384 px", "--size <= 384")
    assert not out.exists()  # nothing to refuse on the corrected rerun
    proc = run_cli("tile", str(cli_pairs), "--out", str(out), "--size", "64", "--stride", "64")
    assert proc.returncode == 0, proc.stderr
    # 5 slides over 3 splits: val and test cannot hold all 4 labels, and tile says so
    assert "split has no patches with label(s)" in proc.stderr, proc.stderr
