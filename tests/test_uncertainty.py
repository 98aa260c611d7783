"""Tests of vstain_cli.uq.intervals: quantiles, risk, Hoeffding-Bentkus bound, RCPS calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from vstain_cli.errors import InputError
from vstain_cli.uq.intervals import (
    FORMS,
    Calibration,
    calibrate_lambda,
    coverage,
    coverage_report,
    credible_interval,
    hb_pvalue,
    hb_ucb,
    image_risk_curve,
    interval_risks,
    multiplicative_interval,
    pixel_risk,
    required_lambda,
    sample_quantiles,
    scaled_interval,
)

# ----------------------------------------------------------------------------- intervals


def test_sample_quantiles_match_numpy():
    s = np.random.default_rng(0).normal(size=(20, 3, 5, 7)).astype(np.float32)
    lo, hi, med, mean = sample_quantiles(s)
    np.testing.assert_allclose(lo, np.quantile(s, 0.05, axis=0), atol=1e-6)
    np.testing.assert_allclose(hi, np.quantile(s, 0.95, axis=0), atol=1e-6)
    np.testing.assert_allclose(med, np.median(s, axis=0), atol=1e-6)
    np.testing.assert_allclose(mean, s.mean(axis=0), atol=1e-6)
    assert lo.shape == (3, 5, 7) and lo.dtype == np.float32
    assert (lo <= med).all() and (med <= hi).all()
    with pytest.raises(ValueError):
        sample_quantiles(s[:1])
    with pytest.raises(ValueError):
        sample_quantiles(s, 0.6, 0.9)


def test_scaled_interval_around_median():
    lo, hi, c = np.array([0.0, -1.0]), np.array([1.0, 3.0]), np.array([0.5, 0.0])
    a, b = scaled_interval(lo, hi, c, 2.0)
    np.testing.assert_allclose(a, [-0.5, -2.0])  # c - 2 (c - lo)
    np.testing.assert_allclose(b, [1.5, 6.0])    # c + 2 (hi - c): skew kept
    a, b = scaled_interval(lo, hi, c, 1.0)
    np.testing.assert_allclose(a, lo) and np.testing.assert_allclose(b, hi)
    a, b = scaled_interval(lo, hi, np.array([2.0, 0.0]), 0.0)  # centre clipped into [lo, hi]
    np.testing.assert_allclose(a, [1.0, 0.0]) and np.testing.assert_allclose(b, [1.0, 0.0])
    maps = credible_interval(np.random.default_rng(1).normal(size=(20, 3, 4, 4)), lam=1.5, form="centered")
    assert (maps.width >= 0).all() and (maps.lower <= maps.median).all()


def test_multiplicative_interval_is_conffusions():
    """[l / lam, u * lam] on [0, 1] intensities, clipped (Horwitz & Hoshen 2022)."""
    lo, hi = np.array([0.2, 0.0, 0.6]), np.array([0.6, 0.3, 0.9])
    a, b = multiplicative_interval(lo, hi, 1.5, (0.0, 1.0))
    np.testing.assert_allclose(a, [0.2 / 1.5, 0.0, 0.4])
    np.testing.assert_allclose(b, [0.9, 0.45, 1.0])  # 1.35 clipped to 1
    # model space [-1, 1] and 0-255 map onto [0, 1] and back
    a2, b2 = multiplicative_interval(2 * lo - 1, 2 * hi - 1, 1.5)
    np.testing.assert_allclose(a2, 2 * a - 1) and np.testing.assert_allclose(b2, 2 * b - 1)
    a3, b3 = multiplicative_interval(255 * lo, 255 * hi, 1.5, (0.0, 255.0))
    np.testing.assert_allclose(a3, 255 * a) and np.testing.assert_allclose(b3, 255 * b)
    a, b = multiplicative_interval(lo, hi, 1.0, (0.0, 1.0))
    np.testing.assert_allclose(a, lo) and np.testing.assert_allclose(b, hi)
    # not affine-invariant, unlike the centered form: widening grows with intensity
    samples = np.random.default_rng(1).uniform(-1, 1, size=(20, 3, 4, 4))
    m = credible_interval(samples, lam=1.5, form="multiplicative")
    c = credible_interval(samples, lam=1.5, form="centered")
    assert (m.lower <= c.median).all() and (m.upper >= c.median).all() and not np.allclose(m.lower, c.lower)
    with pytest.raises(ValueError, match="unknown interval form"):
        credible_interval(samples, lam=1.5, form="additive")


def test_pixel_risk_units():
    t = np.zeros((2, 3, 2, 2))
    lo, hi = -np.ones_like(t), np.ones_like(t)
    t[0, 0, 0, 0] = 5.0  # one channel of one pixel of image 0 outside
    np.testing.assert_allclose(pixel_risk(t, lo, hi), [1 / 12, 0.0])
    np.testing.assert_allclose(pixel_risk(t, lo, hi, any_channel=True), [1 / 4, 0.0])
    assert pixel_risk(t[1], lo[1], hi[1]).shape == ()
    assert coverage(t, lo, hi) == pytest.approx(1 - 1 / 24)
    assert pixel_risk(np.ones((3, 1, 1)), lo[0, :, :1, :1], hi[0, :, :1, :1]) == 0  # inclusive bounds


@pytest.mark.parametrize("form", FORMS)
def test_required_lambda_agrees_with_pixel_risk(form):
    rng = np.random.default_rng(2)
    s = np.clip(0.4 * rng.normal(size=(20, 6, 3, 8, 8)), -1, 1)  # 20 samples of 6 images, model range
    t = np.clip(0.4 * rng.normal(size=(6, 3, 8, 8)) * 1.3, -1, 1)
    lo, hi, med, _ = sample_quantiles(s)
    grid = np.array([0.0, 0.5, 1.0, 1.32, 2.0, 4.0])
    curves = interval_risks(t, lo, hi, med, grid, form)
    assert curves.shape == (6, 6)
    for k, lam in enumerate(grid):
        a, b = credible_interval(s, lam, form=form).lower, credible_interval(s, lam, form=form).upper
        np.testing.assert_allclose(curves[k], pixel_risk(t, a, b), atol=1e-3)  # float32 maps: ties may flip
    assert (np.diff(curves, axis=0) <= 0).all()  # nested intervals: risk non-increasing
    assert curves[0].min() > 0.9 and curves[-1].max() < curves[2].min()
    np.testing.assert_allclose(image_risk_curve(t[0], lo[0], hi[0], med[0], grid, form), curves[:, 0])


def test_required_lambda_edges():
    ls = required_lambda(np.array([0.0, 1.0, -1.0]), np.zeros(3), np.zeros(3), np.zeros(3), "centered")
    assert ls[0] == 0 and np.isinf(ls[1]) and np.isinf(ls[2])  # zero-width sides never cover
    # multiplicative on [0, 1]: lambda* = max(l / y, y / u)
    y, lo, hi = np.array([0.5, 0.1, 0.0, 0.0, 0.3]), np.array([0.2, 0.2, 0.0, 0.1, 0.0]), np.array([0.4, 0.4, 0.2, 0.2, 0.0])
    ls = required_lambda(y, lo, hi, None, "multiplicative", (0.0, 1.0))
    np.testing.assert_allclose(ls[:3], [1.25, 2.0, 0.0])
    assert np.isinf(ls[3]) and np.isinf(ls[4])  # y = 0 < l: l / lam > 0 always; u = 0 < y: u * lam = 0


# ----------------------------------------------------------------------------- HB bound


def brute_force_ucb(risk_hat, n, delta, grid=200001):
    """sup{R : p(R) >= delta} on a fine grid, p written out with scipy.stats.binom."""
    r = np.linspace(0, 1, grid)[1:-1]
    m = np.minimum(risk_hat, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = np.nan_to_num(m * np.log(m / r)) + np.nan_to_num((1 - m) * np.log((1 - m) / (1 - r)))
    p = np.minimum(np.exp(-n * h1), math.e * stats.binom.cdf(math.ceil(n * risk_hat - 1e-9), n, r))
    ok = r[p >= delta]
    return ok.max() if ok.size else 0.0


@pytest.mark.parametrize("risk_hat,n,delta", [(0.05, 100, 0.1), (0.0, 50, 0.1), (0.2, 30, 0.05),
                                              (0.08, 1000, 0.1), (0.5, 10, 0.2), (0.013, 400, 0.01)])
def test_hb_ucb_matches_brute_force(risk_hat, n, delta):
    ucb = hb_ucb(risk_hat, n, delta)
    assert ucb >= risk_hat
    assert ucb == pytest.approx(brute_force_ucb(risk_hat, n, delta), abs=2e-5)
    assert hb_pvalue(risk_hat, n, ucb) == pytest.approx(delta, rel=1e-6)
    # UCB < alpha exactly when the p-value at alpha is < delta (what the RCPS scan tests)
    for alpha in (ucb * 0.999, ucb * 1.001):
        assert (ucb < alpha) == (hb_pvalue(risk_hat, n, alpha) < delta)


def test_hb_ucb_shape():
    ucbs = [hb_ucb(0.1, n, 0.1) for n in (10, 30, 100, 300, 1000, 10000)]
    assert all(a > b for a, b in zip(ucbs, ucbs[1:]))  # decreasing in n
    assert ucbs[-1] - 0.1 < 0.01  # and tends to the empirical risk
    assert hb_ucb(0.1, 100, 0.01) > hb_ucb(0.1, 100, 0.1)  # more confidence, wider
    assert hb_ucb(0.0, 10, 0.1) == pytest.approx(1 - 0.1 ** (1 / 10), rel=1e-6)  # (1 - R)^n = delta
    assert hb_ucb(1.0, 10, 0.1) == 1.0
    with pytest.raises(ValueError):
        hb_ucb(0.1, 0, 0.1)


# ----------------------------------------------------------------------------- calibration


def synthetic_batch(rng, n, half_width=0.25, shape=(3, 16, 16)):
    """Targets ~ N(mu, s); intervals mu -/+ half_width * s (width 0.5 s), centred at mu.

    A value is inside the lambda-scaled interval iff |Z| <= lambda * half_width, so
    the population risk is R(lambda) = 2 (1 - Phi(lambda * half_width)).
    """
    mu = rng.uniform(-0.5, 0.5, (n, *shape))
    s = rng.uniform(0.05, 0.3, (n, *shape))
    t = mu + s * rng.normal(size=(n, *shape))
    return t, mu - half_width * s, mu + half_width * s, mu


def true_risk(lam, half_width=0.25):
    return 2 * stats.norm.sf(np.asarray(lam) * half_width)


def test_calibration_recovers_known_lambda():
    rng = np.random.default_rng(3)
    alpha, delta = 0.1, 0.1
    lam_true = stats.norm.isf(alpha / 2) / 0.25  # R(lam_true) = alpha: 6.58
    grid = np.round(np.arange(4.0, 10.0, 0.01), 2)
    for n in (500, 8000):
        t, lo, hi, c = synthetic_batch(rng, n)
        cal = calibrate_lambda(interval_risks(t, lo, hi, c, grid, "centered"), grid, alpha, delta)
        # what RCPS should pick given the exact risk curve: smallest lambda with UCB < alpha
        ok = [lam for lam in grid if hb_pvalue(float(true_risk(lam)), n, alpha) < delta]
        assert cal.lam >= lam_true - 0.02
        assert abs(cal.lam - min(ok)) < 0.12, (n, cal.lam, min(ok))
        assert cal.ucb < alpha and cal.risk < alpha and cal.n == n
    assert cal.lam < lam_true + 0.15  # with many images, close to the true lambda


def test_calibration_scan_stops_at_first_violation():
    lambdas = np.array([0.5, 1.0, 1.5, 2.0, 2.5])
    n = 1000
    # a risk that is NOT monotone: low at 0.5, high at 1.0 -> RCPS must stop at 1.0
    means = {0.5: 0.0, 1.0: 0.3, 1.5: 0.05, 2.0: 0.02, 2.5: 0.01}
    cal = calibrate_lambda(lambda lam: np.full(n, means[lam]), lambdas, alpha=0.1, delta=0.1)
    assert cal.lam == 1.5
    with pytest.raises(ValueError, match="alpha"):
        calibrate_lambda(np.full((5, 10), 0.05), lambdas, alpha=0.1, delta=0.1)  # n too small
    with pytest.raises(ValueError):
        calibrate_lambda(np.zeros((4, 10)), lambdas)


def test_coverage_after_calibration_on_held_out_data():
    rng = np.random.default_rng(4)
    alpha, delta = 0.1, 0.1
    grid = np.round(np.arange(0.0, 12.0, 0.02), 2)
    # RCPS guarantee: P(held-out risk > alpha) <= delta over calibration sets
    failures = 0
    trials = 40
    for _ in range(trials):
        t, lo, hi, c = synthetic_batch(rng, 100, shape=(3, 4, 4))
        cal = calibrate_lambda(interval_risks(t, lo, hi, c, grid, "centered"), grid, alpha, delta)
        failures += true_risk(cal.lam) > alpha
    assert failures <= 2 * delta * trials
    t, lo, hi, c = synthetic_batch(rng, 400)
    cal = calibrate_lambda(interval_risks(t, lo, hi, c, grid, "centered"), grid, alpha, delta)
    t2, lo2, hi2, c2 = synthetic_batch(rng, 400)
    report = coverage_report(t2, lo2, hi2, c2, cal.lam, alpha, "centered")
    assert report["coverage"] >= 1 - alpha
    assert report["images_within_alpha"] > 0.9 and report["n"] == 400


def multiplicative_batch(rng, n, shape=(3, 8, 8)):
    """On [0, 1]: l = m / 2, u = m, y = m U with U ~ Uniform(0.25, 2), m in [0.05, 0.5].

    y is inside [l / lam, u lam] iff 0.5 / lam <= U <= lam, so for lam in [0.5, 2] the
    population risk is R(lam) = (1.75 - lam + 0.5 / lam) / 1.75; R = 0.1 at the
    root of lam^2 - 1.575 lam - 0.5 = 0, lam_true = 1.8459.
    """
    m = rng.uniform(0.05, 0.5, (n, *shape))
    return m * rng.uniform(0.25, 2.0, (n, *shape)), m / 2, m, m


def test_multiplicative_calibration_recovers_known_lambda():
    rng = np.random.default_rng(6)
    alpha, delta = 0.1, 0.1
    lam_true = (1.575 + math.sqrt(1.575**2 + 2.0)) / 2
    grid = np.round(np.arange(0.5, 3.0, 0.005), 3)
    n = 3000
    t, lo, hi, m = multiplicative_batch(rng, n)
    cal = calibrate_lambda(interval_risks(t, lo, hi, m, grid, "multiplicative", (0.0, 1.0)), grid, alpha, delta,
                           interval="multiplicative")
    exact = [lam for lam in grid if hb_pvalue((1.75 - lam + 0.5 / lam) / 1.75, n, alpha) < delta]
    assert lam_true - 0.01 <= cal.lam < lam_true + 0.06 and abs(cal.lam - min(exact)) < 0.03
    assert cal.interval == "multiplicative" and cal.ucb < alpha
    t2, lo2, hi2, m2 = multiplicative_batch(rng, 500)
    rep = coverage_report(t2, lo2, hi2, m2, cal.lam, alpha, "multiplicative", (0.0, 1.0))
    assert rep["coverage"] >= 1 - alpha
    # the centered form of the same intervals needs another lambda: the forms are not interchangeable
    # (centered around the midpoint 0.75 m: |U - 0.75| <= lam / 4, R = 0.1 at lam = 4.3)
    wide = np.round(np.arange(0, 10, 0.01), 2)
    cen = calibrate_lambda(interval_risks(t, lo, hi, 0.75 * m, wide, "centered"), wide, alpha, delta)
    assert 4.25 < cen.lam < 4.45


@pytest.mark.parametrize("form", FORMS)
def test_end_to_end_from_diffusion_like_samples(form):
    """20 samples per input from the right distribution: lambda near 1, coverage >= 90 %, in either form."""
    rng = np.random.default_rng(5)

    def batch(n):
        mu, s = rng.uniform(-0.5, 0.5, (n, 3, 8, 8)), rng.uniform(0.05, 0.2, (n, 3, 8, 8))
        samples = mu + s * rng.normal(size=(20, n, 3, 8, 8))
        lo, hi, med, _ = sample_quantiles(samples)
        return mu + s * rng.normal(size=(n, 3, 8, 8)), lo, hi, med

    cal = calibrate_lambda(interval_risks(*batch(300), form=form), alpha=0.1, delta=0.1, samples=20,
                           interval=form)
    assert 0.9 < cal.lam < 1.6
    t, lo, hi, med = batch(300)
    lo, hi = cal.apply(lo, hi, med)
    assert coverage(t, lo, hi) >= 0.9


def test_calibration_json_round_trip_and_errors(tmp_path):
    cal = Calibration(lam=1.32, alpha=0.1, delta=0.1, risk=0.07, ucb=0.095, n=400, samples=20,
                      grid=[0.0, 10.0, 1001.0])
    path = tmp_path / "calibration.json"
    cal.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "vstain-calibration" and doc["format_version"] == 2
    assert doc["interval"] == "multiplicative" and doc["samples"] == 20
    assert Calibration.from_json(path) == cal
    legacy = {k: v for k, v in doc.items() if k != "interval"} | {"format_version": 1}
    path.write_text(json.dumps(legacy))
    assert Calibration.from_json(path).interval == "centered"  # version 1 only knew the centered form
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"lam": 1.0}), json.dumps({"format": "vstain-calibration"}),
                 json.dumps({**cal.to_dict(), "lam": -1}), json.dumps({**cal.to_dict(), "n": "many"}), "[]",
                 json.dumps({**cal.to_dict(), "interval": "additive"})):
        bad.write_text(text)
        with pytest.raises(InputError) as e:
            Calibration.from_json(bad)
        assert "bad.json" in str(e.value)
    with pytest.raises(InputError, match="not found"):
        Calibration.from_json(tmp_path / "missing.json")
