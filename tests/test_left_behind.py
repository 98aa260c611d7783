"""Failed commands name the real problem first (inputs before outputs) and leave no output behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_error_line, run_cli


@pytest.fixture(scope="module")
def af_slide(tmp_path_factory) -> Path:
    from vstain_cli.data.synth.render import synth

    out = tmp_path_factory.mktemp("af")
    synth(out, slides=1, size=(128, 128), channels=3, mpp=0.5, seed=0)
    return next(out.glob("*.af.ome.tif"))


def test_stain_names_a_missing_af_before_an_existing_output(tmp_path):
    existing = tmp_path / "out.tif"
    existing.write_bytes(b"old")
    for extra in ([], ["--force"]):
        r = run_cli("stain", "missing.af.ome.tif", "-m", "no-run", "-o", str(existing), *extra, cwd=tmp_path)
        assert_one_error_line(r, "missing.af.ome.tif", "file not found")
    assert existing.read_bytes() == b"old"


def test_stain_and_uncertainty_name_a_missing_model_before_an_existing_output(tmp_path, af_slide):
    (tmp_path / "out.tif").write_bytes(b"old")
    r = run_cli("stain", str(af_slide), "-m", "no-run", "-o", "out.tif", cwd=tmp_path)
    assert_one_error_line(r, "no-run", "run folder not found")
    (tmp_path / "maps").mkdir()
    r = run_cli("uncertainty", "missing.tif", "-m", "no-run", "-o", "maps", cwd=tmp_path)
    assert_one_error_line(r, "missing.tif", "file not found")


def test_a_failed_score_leaves_no_output_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("real", "fake"):
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 255, (6, 3, 32, 32), dtype=np.uint8))
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 100)
    r = run_cli("score", "--real", "real.npy", "--fake", "fake.npy", "--inception-weights", "bad.pth",
                "--out", "sc", cwd=tmp_path)
    assert_one_error_line(r, "bad.pth")
    assert not (tmp_path / "sc").exists()  # the core had created it; the CLI removes what a failure made
    r = run_cli("score", "--out", "sc2", cwd=tmp_path)
    assert_one_error_line(r, "--fake")
    assert not (tmp_path / "sc2").exists()

