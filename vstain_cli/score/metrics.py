"""Image-quality metrics: Fréchet distance (FSD / FID), L1, L2, PSNR, SSIM, intervals.

Definitions are in docs/metrics.md. Everything here is numpy/scipy/scikit-image on
features or uint8 RGB arrays; feature extractors (StainNet, InceptionV3) live in
``vstain_cli.nets`` and are applied by ``vstain_cli.score.scoring``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vstain_cli import seeding

#: Offset added to both covariance diagonals when the trace term is not finite
#: (the same guard and value as pytorch-fid's ``calculate_frechet_distance``).
FD_EPS = 1e-6


@dataclass
class FDResult:
    """A Fréchet distance with an optional warning (singular covariance)."""

    value: float
    warning: str | None = None


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, ddof=1 as pytorch-fid) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    mu = f.mean(axis=0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for PSD S1, S2, through a symmetric PSD similar matrix.

    With any factor S1 = R R^T, S1 S2 is similar (up to zero eigenvalues) to
    R^T S2 R, which is symmetric PSD, so tr sqrt(S1 S2) = sum_i sqrt(lambda_i(R^T S2 R)).
    R is the Cholesky factor when S1 is positive definite (cheap), else the
    symmetric sqrt(S1) from an eigendecomposition, i.e. the form
    sqrt(S1) S2 sqrt(S1). No complex parts arise; round-off negative eigenvalues
    are clipped to 0.
    """
    try:
        r = np.linalg.cholesky((s1 + s1.T) / 2)
    except np.linalg.LinAlgError:  # singular S1 (fewer samples than dimensions)
        r = _sqrt_psd(s1)
    m = r.T @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _fd_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD of the Gaussians fitted to f1, f2 without forming D x D covariances.

    With centred data A_i (N_i x D), S_i = A_i^T A_i / (N_i - 1), tr S_i =
    ||A_i||_F^2 / (N_i - 1) and tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((N1-1)(N2-1))
    (the nonzero eigenvalues of S1 S2 are the squared singular values of
    A1 A2^T / sqrt((N1-1)(N2-1))). Exact; cheap when N < D.
    """
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1, a2 = f1 - mu1, f2 - mu2
    k1, k2 = len(f1) - 1, len(f2) - 1
    nuc = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(k1 * k2)
    d = mu1 - mu2
    return max(float(d @ d + (a1 * a1).sum() / k1 + (a2 * a2).sum() / k2 - 2.0 * nuc), 0.0)


def fd_value(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N1, D), (N2, D).

    Uses :func:`frechet_distance` on the fitted (mu, sigma) when both N > D, and the
    exact low-rank form (:func:`_fd_low_rank`) when a covariance is singular.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if not (np.isfinite(f1).all() and np.isfinite(f2).all()):
        raise ValueError("features contain NaN or inf")
    if min(len(f1), len(f2)) <= f1.shape[1]:
        return _fd_low_rank(f1, f2)
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def frechet_distance(
    mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = FD_EPS
) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))   (Dowson & Landau 1982;
    used as FID by Heusel et al. 2017). float64 throughout. If the trace term is not
    finite, ``eps * I`` is added to both covariances (as pytorch-fid does).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, s1, mu2, s2)):
        raise ValueError("means/covariances contain NaN or inf (broken features?)")
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        off = eps * np.eye(s1.shape[0])
        tr_covmean = trace_sqrt_product(s1 + off, s2 + off)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Exact FD is >= 0; round-off can give a tiny negative number for equal sets.
    return max(value, 0.0)


def rank_warning(n: int, dim: int, what: str = "features") -> str | None:
    """A message when N samples cannot give a full-rank D x D covariance (N <= D)."""
    if n > dim:
        return None
    return (
        f"{n} tiles give a singular {dim}x{dim} covariance of {what}: the Fréchet distance "
        f"is biased and unstable; use at least {dim + 1} tiles (many more, e.g. "
        f"{10 * dim}, for stable values)"
    )


def fd_from_features(f1: np.ndarray, f2: np.ndarray, what: str = "features") -> FDResult:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    f1, f2 = np.asarray(f1), np.asarray(f2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < 2:
        raise ValueError("need at least 2 feature vectors per set")
    n, dim = min(len(f1), len(f2)), f1.shape[1]
    return FDResult(fd_value(f1, f2), rank_warning(n, dim, what))


def _on_device(f1: np.ndarray, f2: np.ndarray, device: Any) -> tuple[Any, Any]:
    """float64 tensor copies of both feature sets on ``device`` (None, None without one)."""
    if device is None:
        return None, None
    import torch

    return tuple(torch.as_tensor(f, dtype=torch.float64, device=device) for f in (f1, f2))


def _fd_rows(f1: np.ndarray, f2: np.ndarray, t1: Any, t2: Any, i1: np.ndarray, i2: np.ndarray,
             device: Any) -> float:
    """The Fréchet distance of rows ``i1`` of ``f1`` and ``i2`` of ``f2`` (on ``device``'s copies t1, t2 if given)."""
    if device is None:
        return fd_value(f1[i1], f2[i2])
    import torch

    j1, j2 = (torch.as_tensor(i, device=device) for i in (i1, i2))
    return _fd_value_torch(t1[j1], t2[j2])


def _fd_value_torch(f1, f2) -> float:
    """:func:`fd_value` in torch float64 on the tensors' device (same formulas)."""
    import torch

    n1, n2, dim = len(f1), len(f2), f1.shape[1]
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mu1, f2 - mu2
    d = mu1 - mu2
    if min(n1, n2) <= dim:  # exact low-rank form, see _fd_low_rank
        nuc = torch.linalg.svdvals(a1 @ a2.T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
        tr = (a1 * a1).sum() / (n1 - 1) + (a2 * a2).sum() / (n2 - 1)
        return max(float(d @ d + tr - 2 * nuc), 0.0)
    s1, s2 = a1.T @ a1 / (n1 - 1), a2.T @ a2 / (n2 - 1)
    r, info = torch.linalg.cholesky_ex(s1)
    if int(info) != 0:  # singular: symmetric square root, as trace_sqrt_product
        w, v = torch.linalg.eigh(s1)
        r = (v * w.clamp_min(0).sqrt()) @ v.T
    m = r.T @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return max(float(d @ d + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean), 0.0)


#: Fraction of each feature set drawn (without replacement) per FD subsample.
FD_SUBSAMPLE_FRACTION = 0.5


def fd_interval(
    f1: np.ndarray,
    f2: np.ndarray,
    n_sub: int = 100,
    seed: int = 0,
    paired: bool = False,
    level: float = 0.95,
    fraction: float = FD_SUBSAMPLE_FRACTION,
    device: str | None = None,
    callback: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Subsampling interval of the FD: subsets drawn *without* replacement.

    Each of ``n_sub`` subsamples keeps m_i = round(fraction * N_i) distinct rows of
    each set (the same rows of both when ``paired``) and recomputes FD_m. A
    with-replacement bootstrap would duplicate ~37 % of the rows, shrink the
    covariance and inflate FD, so its interval can miss the estimate entirely
    (docs/metrics.md). Subsampling (Politis & Romano 1994) with two corrections:

    * centring on the mean of the FD_m, not on FD_N: a smaller sample has a
      larger upward FD bias (~c/m instead of c/N, Chong & Forsyth 2020), which
      must not shift the interval;
    * rescaling the deviations by sqrt(m / (N - m)): without replacement
      Var(FD_m | data) ~ s^2 (1/m - 1/N) while Var(FD_N) ~ s^2 / N (the
      finite-population form of the usual sqrt(m / N) factor; the delete-d
      jackknife scale, Shao & Wu 1989). With m = N/2 the factor is 1.

    Returns the subsampling ("basic") interval [FD_N - s q_hi, FD_N - s q_lo] of
    E[FD_N] (the FD expected at this N), with q the quantiles of the centred FD_m;
    the lower end is clipped at 0. It contains FD_N whenever the subsample mean
    lies between those quantiles. ``device`` (e.g. "cuda") computes the FD_m in
    torch float64 there (the rows drawn are the same). ``callback()`` follows
    each subsample.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if n_sub < 2:
        raise ValueError(f"need at least 2 subsamples, got {n_sub}")
    n1, n2 = len(f1), len(f2)
    m1, m2 = (min(max(int(round(fraction * n)), 2), n - 1) for n in (n1, n2))
    if min(n1, n2) < 3:
        raise ValueError(f"an FD interval needs at least 3 rows per set, got {n1} and {n2}")
    same = paired and n1 == n2
    rng = seeding.numpy_rng(seed)
    t1, t2 = _on_device(f1, f2, device)
    vals = np.empty(n_sub)
    for b in range(n_sub):
        i1 = rng.permutation(n1)[:m1]
        i2 = i1 if same else rng.permutation(n2)[:m2]
        vals[b] = _fd_rows(f1, f2, t1, t2, i1, i2, device)
        if callback is not None:
            callback()
    # Finite-population rescaling, one factor per set (equal for equal fractions).
    ratios = [m / (n - m) for m, n in ((m1, n1),) + (() if same else ((m2, n2),))]
    scale = float(np.sqrt(np.mean(ratios)))
    a = (1 - level) / 2
    q_lo, q_hi = np.quantile(vals - vals.mean(), [a, 1 - a])
    est = fd_value(f1, f2)
    return max(est - scale * float(q_hi), 0.0), est - scale * float(q_lo)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean of ``values``.

    Non-finite values (e.g. the infinite PSNR of an identical pair) propagate: the
    mean and interval are then infinite/NaN as the data say.
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = seeding.numpy_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, min(n_boot, 4_000_000 // v.size))  # bound memory to ~32 MB of indices
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s : s + k] = v[rng.integers(0, v.size, (k, v.size))].mean(axis=1)
    a = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.quantile(means, [a, 1 - a])
    return mean, float(lo), float(hi)


# ---------------------------------------------------------------- slide-level (cluster) bootstrap
#
# Tiles of one slide share its tissue, stain batch and grade: they are not independent draws,
# so resampling tiles gives intervals as if the slide count were the tile count. The cluster
# bootstrap (Davison & Hinkley 1997, sec. 3.8; Field & Welsh 2007) resamples whole slides with
# replacement and keeps every tile of each drawn slide. Definitions: docs/metrics.md.


def cluster_codes(groups: np.ndarray | list) -> tuple[np.ndarray, int]:
    """(code per tile in 0..S-1, S) for the group (slide id) of each tile, codes in sorted-id order."""
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    codes = codes.ravel()
    return codes, int(codes.max()) + 1 if codes.size else 0


def cluster_weights(n_clusters: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each of S slides is drawn in each resample: int (n_boot, S), rows summing to S.

    Depends only on (S, n_boot, seed), so every model and metric scored with one
    seed sees the same slide draws.
    """
    rng = seeding.numpy_rng(seed)
    draws = rng.integers(0, n_clusters, (n_boot, n_clusters))
    w = np.zeros((n_boot, n_clusters), np.int64)
    np.add.at(w, (np.repeat(np.arange(n_boot), n_clusters), draws.ravel()), 1)
    return w


def cluster_means(values: np.ndarray, codes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over all tiles of the drawn slides, per resample: (W @ slide sums) / (W @ slide sizes)."""
    v = np.asarray(values, np.float64).ravel()
    s = weights.shape[1]
    sums = np.bincount(codes, weights=v, minlength=s)  # inf/nan propagate, as in bootstrap_ci
    sizes = np.bincount(codes, minlength=s).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ sums) / (weights @ sizes)


def small_sample_factor(n_clusters: int) -> float:
    """sqrt(S / (S - 1)): the bootstrap variance of a mean of S units is (S - 1) / S of the usual one."""
    return float(np.sqrt(n_clusters / (n_clusters - 1))) if n_clusters > 1 else float("nan")


def cluster_interval(estimate: float, boot: np.ndarray, n_clusters: int, level: float = 0.95,
                     basic: bool = False) -> tuple[float, float]:
    """95 % interval from slide resamples ``boot`` of a statistic, widened by ``small_sample_factor``.

    ``basic=False``: percentile interval, estimate + c (q - estimate). ``basic=True``
    (Fréchet distances): deviations from the resamples' own mean, flipped,
    [est - c q_hi, est - c q_lo], so the upward bias of resamples with repeated
    slides (fewer distinct tiles) does not shift the interval (see ``fd_interval``).
    Fewer than 2 slides: (nan, nan), no interval can be had.
    """
    if n_clusters < 2:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    b = np.asarray(boot, np.float64)
    c = small_sample_factor(n_clusters)
    with np.errstate(invalid="ignore"):
        if basic:
            fin = b[np.isfinite(b)]
            if fin.size < 2:
                return float("nan"), float("nan")
            q_lo, q_hi = np.quantile(fin - fin.mean(), [a, 1 - a])
            return max(estimate - c * float(q_hi), 0.0), estimate - c * float(q_lo)
        q_lo, q_hi = np.quantile(b, [a, 1 - a])
    if not np.isfinite(estimate):
        return float(q_lo), float(q_hi)
    return estimate + c * (float(q_lo) - estimate), estimate + c * (float(q_hi) - estimate)


def cluster_bootstrap_ci(values: np.ndarray, groups: np.ndarray | list, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): slide-level (cluster) bootstrap interval of the mean over tiles.

    ``groups`` holds the slide id of each value. Each resample draws S slide ids with
    replacement and averages every tile of the drawn slides (a slide drawn twice
    counts twice). Percentile interval widened by sqrt(S / (S - 1)); (mean, nan, nan)
    with fewer than 2 slides.
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    codes, s = cluster_codes(groups)
    if len(codes) != v.size:
        raise ValueError(f"{len(codes)} slide ids for {v.size} values")
    mean = float(v.mean())
    boot = cluster_means(v, codes, cluster_weights(s, n_boot, seed))
    return (mean, *cluster_interval(mean, boot, s, level))


def cluster_rows(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row indices of every tile of each drawn slide, slide ``c`` repeated ``counts[c]`` times."""
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(counts) + 1))
    return np.concatenate([np.tile(order[starts[c]:starts[c + 1]], int(k)) for c, k in enumerate(counts) if k]
                          or [np.zeros(0, np.int64)])


def fd_cluster_interval(
    f1: np.ndarray,
    f2: np.ndarray,
    groups1: np.ndarray | list,
    groups2: np.ndarray | list | None = None,
    n_boot: int = 100,
    seed: int = 0,
    level: float = 0.95,
    device: str | None = None,
    callback: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Slide-level interval of the FD between feature sets f1 (real) and f2 (fake).

    Each resample draws S slide ids with replacement (``cluster_weights``) and
    recomputes the FD on the pooled features of all tiles of the drawn slides, in
    both sets (``groups2``: slide ids of f2's rows, default ``groups1`` for paired
    sets). Interval: ``cluster_interval(basic=True)``, i.e. centred on the
    resamples' mean and flipped, widened by sqrt(S / (S - 1)), lower end clipped at
    0. ``device`` (e.g. "cuda") computes each FD in torch float64 there.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    g1 = np.asarray(groups1, dtype=object).astype(str)
    g2 = g1 if groups2 is None else np.asarray(groups2, dtype=object).astype(str)
    if len(g1) != len(f1) or len(g2) != len(f2):
        raise ValueError(f"slide ids for {len(g1)} and {len(g2)} rows, features have {len(f1)} and {len(f2)}")
    ids = np.unique(np.concatenate([g1, g2]))
    c1, c2 = np.searchsorted(ids, g1), np.searchsorted(ids, g2)
    s = len(ids)
    est = fd_value(f1, f2)
    if s < 2:
        return float("nan"), float("nan")
    w = cluster_weights(s, n_boot, seed)
    t1, t2 = _on_device(f1, f2, device)
    vals = np.full(n_boot, np.nan)
    for b in range(n_boot):
        i1, i2 = cluster_rows(c1, w[b]), cluster_rows(c2, w[b])
        if min(len(i1), len(i2)) >= 2:
            vals[b] = _fd_rows(f1, f2, t1, t2, i1, i2, device)
        if callback is not None:
            callback()
    return cluster_interval(est, vals, s, level, basic=True)


def paired_feature_distance(f_real: np.ndarray, f_fake: np.ndarray) -> np.ndarray:
    """PFD per tile: Euclidean distance between a generated tile's features and its real pair's (N,)."""
    a, b = np.asarray(f_real, np.float64), np.asarray(f_fake, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired features need one shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(axis=1))


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"need two (N, 3, H, W) arrays of equal shape, got {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB (0-255), got {a.dtype} and {b.dtype}")
    return a, b


def l1_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """L1 per image: mean |real - fake| over pixels and channels, 0-255 scale."""
    a, b = _check_pair(real, fake)
    return np.abs(a.astype(np.float64) - b).mean(axis=(1, 2, 3))


def mse_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """Mean squared error per image over pixels and channels, 0-255 scale."""
    a, b = _check_pair(real, fake)
    return ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))


def l2_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """L2 per image: root-mean-square error sqrt(mean (real - fake)^2), 0-255 scale."""
    return np.sqrt(mse_per_image(real, fake))


def psnr_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """PSNR per image (dB, data_range=255) with skimage; inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _check_pair(real, fake)
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)])


def ssim_per_image(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """SSIM per image with skimage (7x7 uniform window, channel_axis, data_range=255)."""
    from skimage.metrics import structural_similarity

    a, b = _check_pair(real, fake)
    if min(a.shape[2:]) < 7:
        raise ValueError(f"SSIM needs tiles of at least 7x7 pixels, got {a.shape[2:]}")
    return np.array(
        [
            structural_similarity(x.transpose(1, 2, 0), y.transpose(1, 2, 0), channel_axis=-1, data_range=255)
            for x, y in zip(a, b)
        ]
    )


#: Paired distortion metrics: name -> per-image function on uint8 (N, 3, H, W).
DISTORTION: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "L1": l1_per_image,
    "L2": l2_per_image,
    "PSNR": psnr_per_image,
    "SSIM": ssim_per_image,
}
