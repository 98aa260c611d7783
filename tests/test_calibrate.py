"""``vstain calibrate``: RCPS calibration of the interval scale on a dataset split.

The oracle run (tests/test_uncertainty_maps.py) samples x0 ~ N(mu, s^2) per pixel
only approximately: few DDIM steps shrink the spread, so the raw 5-95 % interval
under-covers targets drawn from the true N(mu, s^2), and calibration must widen it
(lambda > 1), more so with fewer steps; held-out coverage must reach 1 - alpha.

The same RCPS also calibrates the trivial constant band, the block means of
structure scales and a one-pass interval run's bounds (interval sources); those
are checked on constructed data whose answer is known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run, coverage_warning
from vstain_cli.uq.compat import CalibrationFile
from vstain_cli.uq.intervals import (
    Calibration,
    IntervalSource,
    RiskTable,
    band_interval,
    block_means,
    calibrate_band,
    calibrate_intervals,
    calibrate_samples,
    coverage_report,
    hb_ucb,
    scale_interval,
    source_interval,
)

BUNDLED_CALIBRATION = Path(__file__).resolve().parents[1] / "models/runs/phantom-diffusion/calibration.json"


def with_mpp(ds: Path, mpp: float) -> Path:
    """Record the tiles' scale (µm/px) in a dataset's dataset.json, as `vstain tile` does."""
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "mpp": mpp}))
    return ds


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
    ds = with_mpp(make_tiny_dataset(root / "ds", per_slide=16), 1.0)
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
                   "--n", "32", "--alpha", "0.5", "--device", "cpu", "--batch-size", "32",
                   "--baseline", str(env["reg"]), "--scale", "4", "--scale", "16")
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "lambda" in proc.stdout and "test coverage" in proc.stdout and "UCB" in proc.stdout
    # the trivial bands next to the diffusion interval, the verdict, the structure scales, the slides used
    assert "band +-c around the regression output" in proc.stdout and "band +-c around the diffusion sample mean" \
        in proc.stdout
    assert proc.stdout.count("than the band +-c around the regression output at the same test coverage") == 3
    assert "structure scales" in proc.stdout and "calibration tiles from 2 val slides of grades 1, 2" in proc.stdout
    assert "no slide of grades 0, 3" in proc.stderr
    doc = json.loads((run / "calibration.json").read_text())
    assert [s["block_px"] for s in doc["scales"]] == [4, 16] and doc["baselines"]["baseline_run"]["c"] > 0
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
    no_mpp = make_tiny_dataset(tmp_path / "nompp", per_slide=2)
    assert_one_error_result(cal(env["diff"], no_mpp, "--scale", "4"), "records no tile scale (mpp")
    assert_one_error_result(cal(env["diff"], env["ds"], "--scale", "0"), "--scale must be a positive length")
    assert_one_error_result(cal(env["diff"], env["ds"], "--baseline", str(env["diff"])),
                            "--baseline must be a regression or pix2pix run")
    broken = tmp_path / "broken"
    shutil.copytree(env["diff"], broken)
    (broken / "weights.safetensors").write_bytes(b"not safetensors")
    assert_one_error_result(cal(broken, env["ds"]), "weights.safetensors")
    (broken / "calibration.json").write_text("{}")
    assert_one_error_result(cal(broken, env["ds"]), "--force")


# ----------------------------------------------------------------------------- interval sources, constructed


def gaussian_case(rng, n=400, size=8, sd=0.1):
    """Points in [-0.8, 0.8] and targets point + N(0, sd^2) per value (model units)."""
    point = rng.uniform(-0.8, 0.8, (n, 3, size, size))
    return point, point + sd * rng.standard_normal(point.shape)


def test_trivial_band_c_is_calibrated():
    """c of the band [p - c, p + c] by RCPS: 90 % of |N(0, sd)| is 1.645 sd = 21.0 levels at sd = 0.1."""
    rng = np.random.default_rng(0)
    point, target = gaussian_case(rng)
    cal = calibrate_band(point, target, alpha=0.1, delta=0.1)
    assert cal.source == "band" and cal.center == "point" and cal.interval == "centered" and cal.q_low is None
    true_c = 1.645 * 0.1 * 127.5
    assert true_c < cal.lam < 1.25 * true_c and cal.ucb < 0.1  # conservative, close
    # held out: fresh draws from the same distribution reach 1 - alpha at the calibrated c
    p2, t2 = gaussian_case(rng)
    lo, hi = source_interval(cal, p2)
    assert np.allclose(hi - lo, 2 * cal.lam / 127.5)
    held = coverage_report(t2, *band_interval(p2)[:2], p2, cal.lam, 0.1, "centered")
    assert held["coverage"] >= 0.9
    # the band's table gives the same coverage and clipped width without a second pass
    table = RiskTable(IntervalSource("band"))
    table.add(t2, p2)
    rep = table.report(cal.lam, 0.1)
    assert rep["coverage"] == pytest.approx(held["coverage"]) and rep["mean_width"] == pytest.approx(held["mean_width"])
    # c is the RCPS choice: one grid step lower, the Hoeffding-Bentkus bound is no longer below alpha
    val = RiskTable(IntervalSource("band"))
    val.add(target, point)
    below = val.report(cal.lam - 0.25, 0.1)
    assert hb_ucb(below["risk"], below["n"], 0.1) >= 0.1 > hb_ucb(val.report(cal.lam)["risk"], 400, 0.1)
    with pytest.raises(ValueError, match="additive"):
        IntervalSource("band", "multiplicative")


def test_samples_beat_the_band_only_where_the_spread_varies():
    """Heteroscedastic truth (sd 0.02 or 0.3 per pixel): sample quantiles adapt, a constant band cannot, so at
    the same held-out coverage the calibrated sample interval is narrower; with a constant sd it is not."""
    rng = np.random.default_rng(1)
    for varying, narrower in ((True, True), (False, False)):
        sd = (np.where(rng.random((1, 1, 1, 8, 8)) < 0.5, 0.02, 0.3) if varying
              else np.full((1, 1, 1, 8, 8), 0.15))
        mu = rng.uniform(-0.3, 0.3, (1, 300, 3, 8, 8))
        samples = mu + sd * rng.standard_normal((20, 300, 3, 8, 8))
        target = (mu + sd * rng.standard_normal(mu.shape))[0]
        cal = calibrate_samples(samples, target, form="centered")
        t_samp = RiskTable(IntervalSource("samples", "centered"))
        t_samp.add(target, samples)
        cov = t_samp.report(cal.lam)["coverage"]
        lo, hi = source_interval(cal, samples)
        width = float(np.mean(np.clip(hi, -1, 1) - np.clip(lo, -1, 1)))
        band = RiskTable(IntervalSource("band"))
        band.add(target, samples.mean(axis=0))
        c = band.lambda_for_coverage(cov)
        assert band.report(c)["coverage"] >= cov
        assert (width < 0.85 * band.report(c)["mean_width"]) is narrower  # measured: 0.76 and 1.11


def test_block_means_narrow_relative_width_at_larger_scales():
    """Independent per-pixel noise averages out over s x s blocks: sd / s, so the calibrated width shrinks ~1/s."""
    rng = np.random.default_rng(2)
    mu = rng.uniform(-0.5, 0.5, (1, 200, 3, 16, 16))
    samples = mu + 0.2 * rng.standard_normal((20, 200, 3, 16, 16))
    target = (mu + 0.2 * rng.standard_normal(mu.shape))[0]
    assert block_means(target, 4).shape == (200, 3, 4, 4) and block_means(target[..., :15, :15], 4).shape[-1] == 3
    assert np.allclose(block_means(target, 4)[0, 0, 0, 0], target[0, 0, :4, :4].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        block_means(target, 32)
    widths = {}
    for block in (1, 4, 8):
        cal = calibrate_samples(samples, target, form="centered", block=block)
        assert cal.risk_unit == ("pixel-channel" if block == 1 else "block-channel") and cal.samples == 20
        lo, hi = scale_interval(block_means(samples, block), cal)
        t = block_means(target, block)
        assert np.mean((t >= lo) & (t <= hi)) >= 0.9
        widths[block] = float(np.mean(hi - lo))
    assert widths[4] < 0.35 * widths[1] and widths[8] < 0.6 * widths[4]


def test_interval_source_bounds_of_a_one_pass_run():
    """Bounds m -/+ sd around a target m + N(0, sd^2): centered lambda* = |Z|, so lambda -> 1.645 (90 %)."""
    rng = np.random.default_rng(3)
    mid, target = gaussian_case(rng, n=500)
    lower, upper = mid - 0.1, mid + 0.1
    cal = calibrate_intervals(lower, upper, target)
    assert cal.source == "bounds" and cal.center == "midpoint" and cal.interval == "centered"
    assert 1.645 <= cal.lam < 1.85 and cal.ucb < 0.1 and cal.samples is None
    # crossing quantile heads are sorted (rearrangement): swapped bounds calibrate the same
    assert calibrate_intervals(upper, lower, target).lam == cal.lam
    lo, hi = source_interval(cal, (lower, upper))
    assert np.allclose(hi - lo, 0.2 * cal.lam)
    m2, t2 = gaussian_case(rng, n=500)
    lo2, hi2 = source_interval(cal, (m2 - 0.1, m2 + 0.1))
    assert np.mean((t2 >= lo2) & (t2 <= hi2)) >= 0.9
    # Conffusion's multiplicative form calibrates the same bounds too, and covers
    mult = calibrate_intervals(lower, upper, target, form="multiplicative")
    assert mult.interval == "multiplicative" and mult.lam > 1
    lo3, hi3 = source_interval(mult, (m2 - 0.1, m2 + 0.1))
    assert np.mean((t2 >= lo3) & (t2 <= hi3)) >= 0.9
    with pytest.raises(ValueError, match="no lambda up to 1"):
        calibrate_intervals(lower, upper, target + 0.5, lambda_max=1.0)


def test_old_calibration_files_read_as_before(tmp_path):
    """A calibration.json written before sources and scales (no ``source``, no ``scales``) reads as a per-pixel
    calibration of samples."""
    pre_scales = {k: v for k, v in json.loads(BUNDLED_CALIBRATION.read_text()).items()
                  if k not in ("source", "scales", "baselines", "forms")}
    older = tmp_path / "pre-scales.json"
    older.write_text(json.dumps(pre_scales))
    f = CalibrationFile.read(older)
    assert f.cal.source == "samples" and f.cal.interval == "multiplicative" and f.cal.lam > 1
    assert f.cal.q_low == 0.05 and f.scales() == []
    with pytest.raises(InputError, match=r"has no calibration at --scale 4 µm \(scales calibrated: none\)"):
        f.scale(4)
    # a version-1 file (no interval either) is centered; a bad scales entry names the file and the entry
    doc = json.loads(BUNDLED_CALIBRATION.read_text())
    for key in ("interval", "source"):
        doc.pop(key, None)
    old = tmp_path / "v1.json"
    old.write_text(json.dumps({**doc, "format_version": 1}))
    assert Calibration.from_json(old).interval == "centered" and Calibration.from_json(old).source == "samples"
    old.write_text(json.dumps({**doc, "scales": [{"scale_um": 4, "block_px": 4, "block_um": 4, "lam": "x"}]}))
    with pytest.raises(InputError, match=r"corrupt calibration file \(scales\[0\]\)"):
        CalibrationFile.read(old).scales()


def test_calibrate_run_records_bands_scales_and_slides(env, tmp_path):
    """One calibrate_run: the per-pixel entry where readers look, the trivial bands next to it, block-mean
    calibrations per structure scale, and the slides and grades used (with a warning: 2 val slides, 2 grades)."""
    ds = with_mpp(shutil.copytree(env["oracle_ds"], tmp_path / "ds"), 1.0)
    run = oracle_run(tmp_path / "oracle")
    p = NullProgress()
    opts = CalibrateOptions(samples=10, steps=5, n=48, batch_size=48, baseline=str(env["reg"]), scales=(1, 4, 16))
    r = calibrate_run(run, ds, opts, progress=p)
    doc = json.loads(r.path.read_text())
    cal = Calibration.from_json(r.path)  # backward compatible: the per-pixel calibration at the top level
    assert cal.source == "samples" and cal.lam == doc["forms"]["multiplicative"]["lam"] == doc["lam"]
    # trivial bands, calibrated at the same alpha and delta, next to the diffusion interval
    mean_band, reg_band = doc["baselines"]["sample_mean"], doc["baselines"]["baseline_run"]
    for b in (mean_band, reg_band):
        assert b["source"] == "band" and b["alpha"] == 0.1 and b["delta"] == 0.1 and b["ucb"] < 0.1
        assert b["test_coverage"]["coverage"] >= 0.9 and 0 < b["test_coverage"]["mean_width_255"] <= 255
        assert b["matched"]["coverage"] >= doc["test_coverage"]["coverage"]
        assert isinstance(b["diffusion_narrower"], bool)
    # sample mean ~ mu, targets ~ N(mu, 0.2^2): c near 1.645 * 0.2 * 127.5 = 42 (conservative with 48 tiles)
    assert 40 < mean_band["c"] < 60
    assert reg_band["model_kind"] == "regression" and reg_band["model"] == str(env["reg"])
    assert reg_band["c"] > mean_band["c"]  # a 1-step regression is far off
    # the oracle's spread is the same everywhere, where a constant band is the right interval: the diffusion
    # interval (multiplicative: wider on bright pixels) is not narrower than the band around its own mean
    assert mean_band["diffusion_narrower"] is False
    # structure scales: block means average the per-pixel noise out; scale 1 at 1 µm/px is the per-pixel interval
    scales = {s["scale_um"]: s for s in doc["scales"]}
    assert [s["block_px"] for s in doc["scales"]] == [1, 4, 16] and scales[4.0]["risk_unit"] == "block-channel"
    assert scales[1.0]["lam"] == cal.lam and scales[1.0]["test_coverage"] == doc["test_coverage"]
    widths = [scales[s]["test_coverage"]["mean_width_255"] for s in (1.0, 4.0, 16.0)]
    assert widths[1] < 0.4 * widths[0] and widths[2] < 0.5 * widths[1]
    assert all(s["test_coverage"]["coverage"] >= 0.9 for s in doc["scales"])
    assert scales[4.0]["baselines"]["sample_mean"]["c"] < mean_band["c"] / 2
    assert scales[4.0]["baselines"]["baseline_run"]["diffusion_narrower"] is True  # off by more than the noise
    f = CalibrationFile.read(r.path)
    assert f.scale(4).cal.lam == scales[4.0]["lam"] and f.scale(4).block_px == 4 and len(f.scales()) == 3
    with pytest.raises(InputError, match="scales calibrated: 1, 4, 16"):
        f.scale(2)
    # slides and grades used; the val split has 2 slides of grades 1 and 2 of the dataset's 0-3
    assert doc["slides"]["calibration"] == {"split": "val", "slides": {"s4": 24, "s5": 24}, "grades": [1, 2]}
    assert doc["slides"]["test"]["grades"] == [0, 3] and doc["slides"]["dataset_grades"] == [0, 1, 2, 3]
    warning = next(w for w in p.warnings if "calibration tiles from" in w)
    assert "2 slides (at least 4 wanted)" in warning and "no slide of grades 0, 3" in warning
    assert warning in doc["warnings"] and doc["provenance"]["inputs"]["baseline"]["sha256_head_tail"]
    # refused in one line: a scale larger than the tiles, a dataset without mpp, a baseline that samples
    with pytest.raises(InputError, match="--scale 64 µm is 64 px at 1 µm/px, larger than the 32 px tiles"):
        calibrate_run(run, ds, CalibrateOptions(scales=(64,)), force=True)
    with pytest.raises(InputError, match="records no tile scale"):
        calibrate_run(run, env["oracle_ds"], CalibrateOptions(scales=(4,)), force=True)
    with pytest.raises(InputError, match="both 4 px blocks"):
        calibrate_run(run, ds, CalibrateOptions(scales=(4, 4.2)), force=True)
    with pytest.raises(InputError, match="--baseline must be a regression or pix2pix run"):
        calibrate_run(run, ds, CalibrateOptions(baseline=str(env["diff"])), force=True)


def test_coverage_warning_needs_four_slides_of_every_grade():
    used = {"split": "val", "slides": {f"s{i}": 10 for i in range(4)}, "grades": [0, 1, 2, 3]}
    assert coverage_warning(used, [0, 1, 2, 3]) is None
    assert "no slide of grade 3" in coverage_warning({**used, "grades": [0, 1, 2]}, [0, 1, 2, 3])
    three = {**used, "slides": {"a": 1, "b": 1, "c": 1}}
    assert "3 slides (at least 4 wanted)" in coverage_warning(three, [0, 1, 2, 3])
