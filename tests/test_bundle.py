"""The bundled phantom runs: fresh for this phantom, small, and resolvable by name."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.conftest import run_cli
from vstain_cli.data.synth.version import PHANTOM_VERSION
from vstain_cli.infer.bundled import BUNDLED, bundle_root, bundled_path, phantom_fingerprint, read_manifest


@pytest.fixture(scope="module")
def manifest():
    m = read_manifest()
    assert m is not None, f"no bundled runs in {bundle_root()}: make them with `vstain demo --retrain --export-bundle`"
    return m


def test_bundle_is_fresh_for_this_phantom(manifest):
    # a change to `vstain synth` that changes its pixels makes the bundled runs stale: retrain them
    assert manifest["phantom_version"] == PHANTOM_VERSION
    assert manifest["phantom_fingerprint"] == phantom_fingerprint(), (
        "the phantom's pixels changed since the bundled runs were trained: "
        "run `vstain demo --retrain --export-bundle models/runs` and commit models/runs")


def test_bundle_matches_the_demo_defaults(manifest):
    from vstain_cli.demo import DemoOptions, bundle_mismatch

    assert manifest["recipe"] == DemoOptions().recipe()
    assert bundle_mismatch(DemoOptions()) is None
    assert "other settings" in bundle_mismatch(DemoOptions(tile=64))


def test_bundled_runs_are_small_and_complete(manifest):
    for name in BUNDLED.values():
        path = bundled_path(name)
        assert path is not None, name
        assert (path / "weights.safetensors").stat().st_size < 8 * 2**20
        assert not (path / "state.pt").exists()
    assert (bundled_path("phantom-diffusion") / "calibration.json").exists()


def test_a_bundled_run_stains_by_name(tmp_path):
    from vstain_cli.data.synth.render import SlideSpec, write_pair

    af, he = tmp_path / "s.af.ome.tif", tmp_path / "s.he.tif"
    write_pair(SlideSpec.random("s", 1, 128, 128, 26, 1.0, 7), af, he, workers=1)
    out = tmp_path / "s.regression.tif"
    proc = run_cli("stain", str(af), "--model", "phantom-regression", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = tifffile.imread(out)
    assert img.shape == (128, 128, 3) and np.asarray(img).std() > 0


def test_a_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom-diffusion").mkdir()
    assert bundled_path("phantom-diffusion") is None


def test_calibrate_never_writes_into_a_bundled_run(tmp_path):
    proc = run_cli("calibrate", "--model", "phantom-diffusion", "--data", str(tmp_path), "--device", "cpu")
    assert proc.returncode == 2 and "bundled run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
