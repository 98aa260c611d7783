"""Fréchet distance, distortion metrics and bootstrap intervals (vstain_cli.score.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage

from vstain_cli.score import metrics


def he_like_tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Real-looking H&E tiles (N, 3, S, S) uint8: pink stroma texture + purple nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        eosin = np.array([235, 160, 205], np.float32) + rng.normal(0, 8, 3)
        fibres = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), (0.7, 3.0))
        img = eosin[:, None, None] * (1 - 0.12 * fibres[None])
        nuclei = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(3, 12)):
            cx, cy = rng.uniform(0, size, 2)
            a, b = rng.uniform(2.5, 5.5, 2)
            t = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            nuclei = np.maximum(nuclei, ((u / a) ** 2 + (v / b) ** 2 < 1).astype(np.float32))
        haem = np.array([85, 55, 150], np.float32)[:, None, None] + rng.normal(0, 10, (3, size, size))
        img = img * (1 - nuclei) + haem * nuclei
        out[i] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return out


def simple_features(x: np.ndarray) -> np.ndarray:
    """Fixed features: per-channel 8-bin histograms + gradient and Laplacian energy."""
    x = x.astype(np.float64)
    feats = []
    for c in range(3):
        ch = x[:, c]
        hist = np.stack([np.histogram(im, bins=8, range=(0, 255))[0] for im in ch]) / ch[0].size
        gx, gy = np.abs(np.diff(ch, axis=2)).mean((1, 2)), np.abs(np.diff(ch, axis=1)).mean((1, 2))
        lap = np.abs(ch[:, 1:-1, 1:-1] * 4 - ch[:, :-2, 1:-1] - ch[:, 2:, 1:-1] - ch[:, 1:-1, :-2] - ch[:, 1:-1, 2:])
        feats += [hist, gx[:, None] / 10, gy[:, None] / 10, lap.mean((1, 2))[:, None] / 10]
    return np.concatenate(feats, axis=1)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return x
    return np.clip(np.rint(ndimage.gaussian_filter(x.astype(np.float32), (0, 0, sigma, sigma))), 0, 255).astype(np.uint8)


def fd_scipy_reference(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy.linalg.sqrtm (the usual reference)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_one_dimensional_closed_form():
    # FD of N(m1, v1), N(m2, v2) = (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2
    got = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx(9.0 + (2.0 - 3.0) ** 2, rel=1e-12)


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("d", [5, 64])
def test_fd_matches_scipy_sqrtm_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    ref = fd_scipy_reference(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # symmetric in its two arguments
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8)


def test_gaussian_stats_matches_numpy_cov():
    f = np.random.default_rng(0).normal(size=(50, 7))
    mu, s = metrics.gaussian_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(s, np.cov(f, rowvar=False))
    assert s.dtype == np.float64


def test_same_set_scores_zero():
    f = np.random.default_rng(0).normal(size=(300, 32)) * 5 + 3
    r = metrics.fd_from_features(f, f)
    assert abs(r.value) < 1e-8
    assert r.warning is None


def test_singular_covariance_is_finite_and_warns():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(10, 40)), rng.normal(size=(12, 40)) + 0.5
    r = metrics.fd_from_features(f1, f2)
    assert np.isfinite(r.value) and r.value > 0
    assert r.warning is not None and "41" in r.warning  # says how many tiles are needed
    # exact reference for rank-deficient sample covariances: S_i = A_i^T A_i / (n_i - 1)
    # with centred data A_i, and tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))
    mu1, s1 = metrics.gaussian_stats(f1)
    mu2, s2 = metrics.gaussian_stats(f2)
    nuc = np.linalg.svd((f1 - mu1) @ (f2 - mu2).T, compute_uv=False).sum() / np.sqrt(9 * 11)
    d = mu1 - mu2
    exact = d @ d + np.trace(s1) + np.trace(s2) - 2 * nuc
    assert r.value == pytest.approx(exact, rel=1e-7)
    # the covariance route (eigen form: Cholesky fails on singular S1) agrees too
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-7)
    assert r.value == pytest.approx(fd_scipy_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_low_rank_form_equals_covariance_form_at_full_rank():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) * 1.5 + 0.2
    via_cov = metrics.frechet_distance(*metrics.gaussian_stats(f1), *metrics.gaussian_stats(f2))
    assert metrics._fd_low_rank(f1, f2) == pytest.approx(via_cov, rel=1e-10)
    assert metrics.fd_value(f1, f2) == pytest.approx(via_cov, rel=1e-12)


def test_fd_rejects_non_finite_statistics():
    s_bad = np.eye(3)
    s_bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), s_bad)


def test_rank_warning_threshold():
    assert metrics.rank_warning(2049, 2048) is None
    msg = metrics.rank_warning(500, 2048)
    assert "2049" in msg and "500" in msg


def test_fd_rises_monotonically_with_blur():
    ref = simple_features(he_like_tiles(160, seed=1))
    test = he_like_tiles(160, seed=2)
    sigmas = [0.0, 0.5, 1.0, 1.5, 2.5, 4.0]
    fds = [metrics.fd_from_features(ref, simple_features(blur(test, s))).value for s in sigmas]
    assert all(b > a for a, b in zip(fds, fds[1:])), fds
    assert fds[-1] > 20 * fds[0]


def two_gaussians(rng, n, d, shift=0.3):
    """Features of two different Gaussians: N(0, I) and N(shift, diag(0.7..1.3)^2)."""
    return rng.normal(size=(n, d)), rng.normal(size=(n, d)) * np.linspace(0.7, 1.3, d) + shift


def test_fd_interval_contains_estimate_where_bootstrap_misses_it():
    # N close to D (as FID with a few thousand tiles): duplicated rows of a
    # with-replacement bootstrap inflate FD, so its percentile interval lies
    # entirely above the estimate (the bug of issue 9); subsampling does not.
    rng = np.random.default_rng(4)
    f1, f2 = two_gaussians(rng, 60, 30)
    fd = metrics.fd_value(f1, f2)
    boot = [metrics.fd_value(f1[rng.integers(0, 60, 60)], f2[rng.integers(0, 60, 60)]) for _ in range(40)]
    assert np.quantile(boot, 0.025) > fd  # the old interval misses the estimate
    lo, hi = metrics.fd_interval(f1, f2, n_sub=40, seed=3)
    assert 0 <= lo < fd < hi
    assert (lo, hi) == metrics.fd_interval(f1, f2, n_sub=40, seed=3)


def test_fd_interval_coverage_and_width_monte_carlo():
    # E[FD_N] and sd(FD_N) from 300 fresh draws; the intervals of 40 data sets
    # must cover E[FD_N] ~95 % of the time with a half-width ~1.96 sd.
    rng = np.random.default_rng(0)
    n, d = 80, 6
    ref = np.array([metrics.fd_value(*two_gaussians(rng, n, d)) for _ in range(300)])
    hits, half = 0, []
    for r in range(40):
        f1, f2 = two_gaussians(rng, n, d)
        lo, hi = metrics.fd_interval(f1, f2, n_sub=60, seed=r)
        assert lo <= metrics.fd_value(f1, f2) <= hi
        hits += lo <= ref.mean() <= hi
        half.append((hi - lo) / 2)
    assert hits / 40 >= 0.85
    assert 0.75 < np.mean(half) / (1.96 * ref.std()) < 1.35


def test_fd_interval_paired_unequal_and_small_sets():
    rng = np.random.default_rng(1)
    f1, f2 = two_gaussians(rng, 50, 4)
    lo, hi = metrics.fd_interval(f1, f2, n_sub=30, paired=True)
    assert lo < metrics.fd_value(f1, f2) < hi
    lo2, hi2 = metrics.fd_interval(f1, f2[:31], n_sub=30)  # unequal N: paired is ignored
    assert lo2 < metrics.fd_value(f1, f2[:31]) < hi2
    with pytest.raises(ValueError, match="at least 3"):
        metrics.fd_interval(f1[:2], f2, n_sub=10)
    with pytest.raises(ValueError, match="fraction"):
        metrics.fd_interval(f1, f2, fraction=1.0)


@pytest.mark.parametrize("n", [12, 40])  # singular (low-rank form) and full-rank covariances
def test_fd_interval_torch_backend_matches_numpy(n):
    rng = np.random.default_rng(n)
    f1, f2 = rng.normal(size=(n, 16)), rng.normal(size=(n + 3, 16)) + 0.2
    a = metrics.fd_interval(f1, f2, n_sub=15, seed=1)
    b = metrics.fd_interval(f1, f2, n_sub=15, seed=1, device="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_bootstrap_ci_of_mean():
    v = np.random.default_rng(0).normal(10, 2, 400)
    mean, lo, hi = metrics.bootstrap_ci(v, n_boot=2000, seed=0)
    assert mean == pytest.approx(v.mean())
    assert lo < mean < hi
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert metrics.bootstrap_ci(np.full(5, 3.0)) == (3.0, 3.0, 3.0)


def test_l1_l2_psnr_known_arrays():
    a = np.zeros((2, 3, 8, 8), np.uint8)
    b = np.full_like(a, 10)
    np.testing.assert_allclose(metrics.l1_per_image(a, b), 10.0)
    np.testing.assert_allclose(metrics.l2_per_image(a, b), 10.0)
    np.testing.assert_allclose(metrics.psnr_per_image(a, b), 20 * np.log10(255 / 10))
    # half the pixel-channels off by 4: L1 = 2, MSE = 8, L2 (RMSE) = sqrt 8
    c = a.copy()
    c[:, :, :4] = 4
    np.testing.assert_allclose(metrics.l1_per_image(a, c), 2.0)
    np.testing.assert_allclose(metrics.mse_per_image(a, c), 8.0)
    np.testing.assert_allclose(metrics.l2_per_image(a, c), np.sqrt(8.0))
    # no uint8 wrap-around: 0 - 255
    d = np.full_like(a, 255)
    np.testing.assert_allclose(metrics.l1_per_image(a, d), 255.0)


def test_ssim_and_psnr_identical_and_noisy():
    x = he_like_tiles(3, size=32)
    np.testing.assert_allclose(metrics.ssim_per_image(x, x), 1.0)
    assert np.isinf(metrics.psnr_per_image(x, x)).all()
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    s = metrics.ssim_per_image(x, noisy)
    assert ((s > 0) & (s < 0.95)).all()


def test_distortion_rejects_bad_inputs():
    a = np.zeros((1, 3, 8, 8), np.uint8)
    with pytest.raises(ValueError):
        metrics.l1_per_image(a, np.zeros((1, 3, 8, 9), np.uint8))
    with pytest.raises(ValueError):
        metrics.l1_per_image(a, a.astype(np.float32))
    with pytest.raises(ValueError):
        metrics.ssim_per_image(np.zeros((1, 3, 5, 5), np.uint8), np.zeros((1, 3, 5, 5), np.uint8))


def test_eps_offset_guard_when_trace_term_not_finite(monkeypatch):
    rng = np.random.default_rng(0)
    mu, s1, s2 = np.zeros(4), random_cov(rng, 4), random_cov(rng, 4)
    real = metrics.trace_sqrt_product
    calls = []

    def flaky(a, b):
        calls.append(1)
        return float("nan") if len(calls) == 1 else real(a, b)

    monkeypatch.setattr(metrics, "trace_sqrt_product", flaky)
    got = metrics.frechet_distance(mu, s1, mu, s2)
    # pytorch-fid: covmean = sqrtm((S1 + eps I)(S2 + eps I)); traces of S1, S2 unchanged
    off = metrics.FD_EPS * np.eye(4)
    covmean = np.real(scipy.linalg.sqrtm((s1 + off) @ (s2 + off)))
    assert len(calls) == 2
    assert got == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), rel=1e-9)
