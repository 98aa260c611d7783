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
    # and the test split says how many it checks on too
    assert "--n 200 is more than the 48 tiles of the test split: checking coverage on all 48" in p.warnings
    cal = Calibration.from_json(few.path)
    assert cal.lam == few.calibration.lam and cal.n == 48 and cal.samples == 10
    assert cal.interval == "multiplicative"  # the default: the paper's (Conffusion's) form
    assert cal.lam > 1.2  # 5 DDIM steps under-disperse: sd ~0.085 vs 0.2
    assert cal.ucb < cal.alpha == 0.1 and 0 <= cal.risk <= cal.ucb
    assert few.test["coverage"] >= 0.9 and few.test["n"] == 48 and few.test["lam"] == cal.lam
    doc = json.loads(few.path.read_text())
    assert doc["sampler"] == "ddim" and doc["steps_effective"] == 5 and doc["seed"] == 0 and doc["split"] == "val"
    assert doc["sampling"] == {"protocol": "fast", "sampler": "ddim", "steps": 5, "eta": 0.0}
    assert doc["interval"] == "multiplicative" and doc["samples"] == 10 and doc["protocol"] == "fast"
    # the same draws give the centered form's lambda too, with its own held-out check
    centered = doc["forms"]["centered"]
    assert doc["forms"]["multiplicative"]["lam"] == cal.lam and centered["lam"] > 1.5
    assert centered["test_coverage"]["coverage"] >= 0.9 and centered["ucb"] < 0.1
    assert doc["test_coverage"]["coverage"] == pytest.approx(few.test["coverage"])
    # widths are of the interval clipped to the valid range, on the 0-255 scale
    assert 0 < few.test["mean_width_255"] <= 255 and 0 < centered["test_coverage"]["mean_width_255"] <= 255
    assert 0 < few.val_width <= 255 and doc["width_unit"].startswith("0-255")
    assert doc["dataset"]["channels"] == 4 and doc["dataset"]["dataset.json"]["sha256_head_tail"]
    curve = doc["risk_curve"]
    assert curve["lam"][0] == 0 and curve["risk"][0] > 0.9 and np.all(np.diff(curve["risk"]) <= 1e-12)
    with pytest.raises(OutputExistsError):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=10, steps=5))
    again = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=10, steps=5, batch_size=32), force=True)
    assert again.calibration.lam == cal.lam and again.test == few.test  # deterministic
    more = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=20, steps=20, batch_size=32,
                                                                 interval="centered"), force=True)
    assert more.calibration.interval == "centered"
    assert 1.0 < more.calibration.lam < centered["lam"]  # more steps: spread closer to SIGMA, less widening
    assert more.test["coverage"] >= 0.9 and "multiplicative" in more.forms


def test_paper_protocol_runs_ddpm_with_T_steps(env, tmp_path):
    """--protocol paper: DDPM over the model's T steps samples the oracle's true spread."""
    run = oracle_run(tmp_path / "oracle", timesteps=100)  # cosine schedule: 100 steps reach pure noise
    opts = dict(samples=10, n=24, alpha=0.3, batch_size=32, interval="centered")
    paper = calibrate_run(run, env["oracle_ds"], CalibrateOptions(protocol="paper", **opts))
    doc = json.loads(paper.path.read_text())
    assert doc["sampling"] == {"protocol": "paper", "sampler": "ddpm", "steps": 100, "eta": 1.0}
    assert doc["sampler"] == "ddpm" and doc["steps_effective"] == 100
    fast = calibrate_run(run, env["oracle_ds"], CalibrateOptions(steps=5, **opts), force=True)
    # the 5-95 % width of N(mu, 0.2^2) is 83.9 (0-255), ~66 from 10 samples (q05 between the 1st and 2nd
    # order statistics): DDPM over T steps samples it,
    # DDIM-5 under-disperses and needs a larger lambda
    assert 55 < paper.val_width < 90 and fast.val_width < 40
    assert paper.calibration.lam < fast.calibration.lam - 1.0
    with pytest.raises(InputError, match="--protocol paper runs the model's T steps; drop --steps 50"):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(protocol="paper", steps=50, **opts), force=True)
    with pytest.raises(InputError, match="unknown --interval"):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(interval="additive"), force=True)


def test_too_few_tiles_and_splits(env, tmp_path):
    run = oracle_run(tmp_path / "oracle")
    with pytest.raises(InputError, match="no lambda up to 10") as e:
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=4, steps=3, n=5))
    # the hint names only options that exist, with their values
    assert ("calibrate on more tiles (--n, now 5), raise --lambda-max (now 10), or raise --alpha (now 0.1)"
            in str(e.value))
    with pytest.raises(InputError, match="--lambda-max must be between 1 and 100"):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(lambda_max=0.5))
    p = NullProgress()
    r = calibrate_run(run, env["oracle_ds"], CalibrateOptions(samples=6, steps=5, test_split=None, alpha=0.3,
                                                              lambda_max=20), progress=p)
    assert r.test is None and json.loads(r.path.read_text())["test_coverage"] is None
    assert r.calibration.grid == [0.0, 20.0, 2001.0]  # --lambda-max sets the grid searched


def test_widths_are_clipped_to_the_valid_range():
    from vstain_cli.uq.intervals import coverage_report, lambda_grid

    assert np.array_equal(lambda_grid(), np.round(np.arange(0.0, 10.0 + 1e-9, 0.01), 2))
    assert lambda_grid(2.5)[-1] == 2.5 and len(lambda_grid(2.5)) == 251
    rng = np.random.default_rng(0)
    med = rng.uniform(-0.5, 0.5, (2, 3, 8, 8))
    lo, hi = med - 0.3, med + 0.3
    for form in ("centered", "multiplicative"):
        r = coverage_report(med, lo, hi, med, 50.0, form=form)  # a huge lambda: the whole range
        assert r["coverage"] == 1.0 and 1.95 < r["mean_width"] <= 2.0  # (almost) all of [-1, 1], never 30


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
    assert cal.n == 32 and cal.samples == 3 and cal.alpha == 0.5 and cal.interval == "multiplicative"
    assert json.loads((run / "calibration.json").read_text())["test_coverage"]["n"] == 32
    assert "DDIM-2, eta 0" in proc.stdout and "centered form, same draws" in proc.stdout
    assert "mean interval width (0-255)" in proc.stdout and "clipped to the valid range, on the 0-255" in proc.stderr
    proc = run_cli("calibrate", "--model", str(run), "--data", str(env["ds"]), "--samples", "3", "--steps", "2",
                   "--n", "32", "--alpha", "0.5", "--device", "cpu", "--batch-size", "32", "--interval", "centered",
                   "--force")
    assert proc.returncode == 0, proc.stderr
    assert Calibration.from_json(run / "calibration.json").interval == "centered"


def test_cli_bad_inputs(env, tmp_path):
    runner = CliRunner()

    def cal(model, data, *extra):
        return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data), "--device", "cpu",
                                   "--samples", "2", "--steps", "1", *extra])

    assert_one_error_result(cal(env["diff"], env["ds5"]), "dataset has 5 AF channels but model")
    assert_one_error_result(cal(env["reg"], env["ds"]), "deterministic")
    assert_one_error_result(cal(env["diff"], env["ds"], "--samples", "1"), "--samples must be at least 2")
    assert_one_error_result(cal(env["diff"], env["ds"], "--sampler", "euler"), "unknown sampler")
    assert_one_error_result(cal(env["diff"], env["ds"], "--interval", "additive"), "unknown --interval")
    assert_one_error_result(cal(env["diff"], env["ds"], "--protocol", "slow"), "unknown --protocol")
    assert_one_error_result(cal(env["diff"], env["ds"], "--lambda-max", "0.5"), "--lambda-max must be between")
    assert_one_error_result(cal(env["diff"], tmp_path / "nope"), "dataset folder not found")
    broken = tmp_path / "broken"
    shutil.copytree(env["diff"], broken)
    (broken / "weights.safetensors").write_bytes(b"not safetensors")
    assert_one_error_result(cal(broken, env["ds"]), "weights.safetensors")
    (broken / "calibration.json").write_text("{}")
    assert_one_error_result(cal(broken, env["ds"]), "--force")
