"""``vstain calibrate``: RCPS calibration of the interval scale on a dataset split.

The oracle run (tests/test_uncertainty_maps.py) samples x0 ~ N(mu, s^2) per pixel
only approximately: few DDIM steps shrink the spread, so the raw 5-95 % interval
under-covers targets drawn from the true N(mu, s^2), and calibration must widen it
(lambda > 1), more so with fewer steps; held-out coverage must reach 1 - alpha.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import assert_one_error_result, make_tiny_dataset, run_cli
from test_uncertainty_maps import SIGMA, oracle_run
from train_helpers import micro
from typer.testing import CliRunner

from vstain_cli.cli.main import app
from vstain_cli.data.loader import spread_indices
from vstain_cli.data.store import normalize_af, open_dataset, unit_to_he
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.progress import NullProgress
from vstain_cli.train.loop import train
from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run
from vstain_cli.uq.intervals import Calibration


def oracle_dataset(root, per_slide: int = 24):
    """The tiny dataset with H&E replaced by draws from the oracle's N(AF[:3] / 2, SIGMA^2)."""
    ds = make_tiny_dataset(root, per_slide=per_slide)
    info = open_dataset(ds)
    rng = np.random.default_rng(3)
    for sid in info.slide_ids():
        af = np.load(ds / "slides" / sid / "af.npy")
        mu = 0.5 * normalize_af(af, info.af_low, info.af_high)[:, :3]
        np.save(ds / "slides" / sid / "he.npy", unit_to_he(mu + SIGMA * rng.standard_normal(mu.shape)))
    return ds


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    ds = make_tiny_dataset(root / "ds", per_slide=16)
    train(micro("tiny-diffusion", model={"attention_levels": []}, train={"steps": 2}), ds, root / "diff", device="cpu")
    train(micro("tiny-regression", model={"attention_levels": []}, train={"steps": 1}), ds, root / "reg", device="cpu")
    return {"root": root, "ds": ds, "diff": root / "diff", "reg": root / "reg",
            "oracle_ds": oracle_dataset(root / "ods"), "ds5": make_tiny_dataset(root / "ds5", channels=5)}


def test_spread_indices():
    idx = spread_indices(100, 7)
    assert idx[0] == 0 and idx[-1] == 99 and len(set(idx.tolist())) == 7 and (np.diff(idx) > 0).all()
    assert spread_indices(5, 200).tolist() == [0, 1, 2, 3, 4] and spread_indices(9, 1).tolist() == [4]


def test_oracle_calibration_widens_and_covers(env, tmp_path):
    run = oracle_run(tmp_path / "oracle")
    p = NullProgress()
    few = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=10, steps=5, batch_size=32), progress=p)
    assert any("48 tiles" in w for w in p.warnings)  # fewer than --n 200 in val: all used
    cal = Calibration.from_json(few.path)
    assert cal.lam == few.calibration.lam and cal.n == 48 and cal.samples == 10
    assert cal.lam > 1.5  # 5 DDIM steps under-disperse: sd ~0.085 vs 0.2
    assert cal.ucb < cal.alpha == 0.1 and 0 <= cal.risk <= cal.ucb
    assert few.test["coverage"] >= 0.9 and few.test["n"] == 48 and few.test["lam"] == cal.lam
    doc = json.loads(few.path.read_text())
    assert doc["sampler"] == "ddim" and doc["steps_effective"] == 5 and doc["seed"] == 0 and doc["split"] == "val"
    assert doc["test_coverage"]["coverage"] == pytest.approx(few.test["coverage"])
    assert doc["dataset"]["channels"] == 4 and doc["dataset"]["dataset.json"]["sha256_head_tail"]
    curve = doc["risk_curve"]
    assert curve["lam"][0] == 0 and curve["risk"][0] > 0.9 and np.all(np.diff(curve["risk"]) <= 1e-12)
    with pytest.raises(OutputExistsError):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=10, steps=5))
    again = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=10, steps=5, batch_size=32), force=True)
    assert again.calibration.lam == cal.lam and again.test == few.test  # deterministic
    more = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=20, steps=20, batch_size=32), force=True)
    assert 1.0 < more.calibration.lam < cal.lam  # more steps: spread closer to SIGMA, less widening
    assert more.test["coverage"] >= 0.9


def test_too_few_tiles_and_splits(env, tmp_path):
    run = oracle_run(tmp_path / "oracle")
    with pytest.raises(InputError, match="no lambda up to 10"):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=4, steps=3, n=5))
    p = NullProgress()
    r = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=6, steps=5, test_split=None, alpha=0.3),
                      progress=p)
    assert r.test is None and json.loads(r.path.read_text())["test_coverage"] is None


def test_cli_subprocess(env, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 threads on a busy 2-core machine run ~10x slower
    run = tmp_path / "run"
    shutil.copytree(env["diff"], run)
    proc = run_cli("calibrate", "--model", str(run), "--data", str(env["ds"]), "--samples", "3", "--steps", "2",
                   "--n", "32", "--alpha", "0.5", "--device", "cpu", "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "lambda" in proc.stdout and "test coverage" in proc.stdout and "UCB" in proc.stdout
    cal = Calibration.from_json(run / "calibration.json")
    assert cal.n == 32 and cal.samples == 3 and cal.alpha == 0.5
    assert json.loads((run / "calibration.json").read_text())["test_coverage"]["n"] == 32


def test_cli_bad_inputs(env, tmp_path):
    runner = CliRunner()

    def cal(model, data, *extra):
        return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data), "--device", "cpu",
                                   "--samples", "2", "--steps", "1", *extra])

    assert_one_error_result(cal(env["diff"], env["ds5"]), "dataset has 5 AF channels but model")
    assert_one_error_result(cal(env["reg"], env["ds"]), "deterministic")
    assert_one_error_result(cal(env["diff"], env["ds"], "--samples", "1"), "--samples must be at least 2")
    assert_one_error_result(cal(env["diff"], env["ds"], "--sampler", "euler"), "unknown sampler")
    assert_one_error_result(cal(env["diff"], tmp_path / "nope"), "dataset folder not found")
    broken = tmp_path / "broken"
    shutil.copytree(env["diff"], broken)
    (broken / "weights.safetensors").write_bytes(b"not safetensors")
    assert_one_error_result(cal(broken, env["ds"]), "weights.safetensors")
    (broken / "calibration.json").write_text("{}")
    assert_one_error_result(cal(broken, env["ds"]), "--force")
