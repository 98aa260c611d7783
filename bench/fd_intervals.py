"""FD intervals of ``vstain score``: subsampling vs the with-replacement bootstrap.

    python bench/fd_intervals.py [--reps 60] [--ref 1000] [--resamples 100]

1. Monte Carlo on Gaussian features (two different Gaussians, ``tests/test_metrics.two_gaussians``)
   at several (D, N): E[FD_N] and sd(FD_N) from ``--ref`` fresh draws; then, over
   ``--reps`` data sets, how often each interval covers E[FD_N], how often it
   contains its own estimate FD_N, and its mean half-width / (1.96 sd).
   "subsample" is ``metrics.fd_interval`` (what ``vstain score`` reports);
   "bootstrap" is the old percentile bootstrap (rows drawn with replacement).
2. The blur table of docs/metrics.md: FD with its ``fd_interval`` between 160 real
   and 160 blurred H&E-like tiles (``tests/test_metrics.he_like_tiles`` and
   ``simple_features``, the fixtures of the monotonicity test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from test_metrics import blur, he_like_tiles, simple_features, two_gaussians  # noqa: E402

from vstain_cli.score import metrics  # noqa: E402


def percentile_bootstrap(f1, f2, n_boot, rng, level=0.95):
    """The old interval: percentile bootstrap, rows resampled with replacement."""
    vals = [metrics.fd_value(f1[rng.integers(0, len(f1), len(f1))], f2[rng.integers(0, len(f2), len(f2))])
            for _ in range(n_boot)]
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return float(lo), float(hi)


def monte_carlo(d: int, n: int, reps: int, n_ref: int, resamples: int) -> dict[str, float]:
    rng = np.random.default_rng(d * 1000 + n)
    ref = np.array([metrics.fd_value(*two_gaussians(rng, n, d)) for _ in range(n_ref)])
    target, sd = ref.mean(), ref.std()
    out = {"D": d, "N": n, "E": target, "sd": sd}
    stats = {k: [0, 0, 0.0] for k in ("subsample", "bootstrap")}
    for r in range(reps):
        f1, f2 = two_gaussians(rng, n, d)
        est = metrics.fd_value(f1, f2)
        for k, (lo, hi) in {
            "subsample": metrics.fd_interval(f1, f2, resamples, seed=r),
            "bootstrap": percentile_bootstrap(f1, f2, resamples, rng),
        }.items():
            stats[k][0] += lo <= target <= hi
            stats[k][1] += lo <= est <= hi
            stats[k][2] += (hi - lo) / 2 / (1.96 * sd) / reps
    for k, (cov, inside, width) in stats.items():
        out.update({f"{k} cover": cov / reps, f"{k} contains": inside / reps, f"{k} width": width})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60, help="data sets per (D, N)")
    ap.add_argument("--ref", type=int, default=1000, help="fresh draws for E[FD_N] and sd(FD_N)")
    ap.add_argument("--resamples", type=int, default=100, help="subsamples / bootstrap resamples per interval")
    a = ap.parse_args()
    t0 = time.perf_counter()
    print(f"## Coverage of E[FD_N], 95 % intervals, {a.reps} data sets, {a.resamples} resamples each\n")
    print("| D | N | E[FD_N] | sd | subsample: covers E | contains FD_N | half-width / 1.96 sd "
          "| bootstrap: covers E | contains FD_N | half-width / 1.96 sd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d, n in [(6, 40), (6, 120), (30, 60), (30, 300)]:
        r = monte_carlo(d, n, a.reps, a.ref, a.resamples)
        print(f"| {d} | {n} | {r['E']:.3f} | {r['sd']:.3f} | {r['subsample cover']:.2f} | "
              f"{r['subsample contains']:.2f} | {r['subsample width']:.2f} | {r['bootstrap cover']:.2f} | "
              f"{r['bootstrap contains']:.2f} | {r['bootstrap width']:.2f} |", flush=True)

    print("\n## FD vs Gaussian blur, 160 vs 160 H&E-like 64 px tiles, "
          f"{a.resamples}-subsample intervals\n")
    ref = simple_features(he_like_tiles(160, seed=1))
    test = he_like_tiles(160, seed=2)
    sigmas = [0.0, 0.5, 1.0, 1.5, 2.5, 4.0]
    cells = []
    for s in sigmas:
        f = simple_features(blur(test, s))
        lo, hi = metrics.fd_interval(ref, f, a.resamples, seed=0)
        cells.append((metrics.fd_value(ref, f), lo, hi))
    print("| blur sigma (px) | " + " | ".join(f"{s:g}" for s in sigmas) + " |")
    print("|---" * (len(sigmas) + 1) + "|")
    print("| FD | " + " | ".join(f"{v:.3g}" for v, _, _ in cells) + " |")
    print(f"| 95 % interval ({a.resamples} subsamples) | "
          + " | ".join(f"[{lo:.3g}, {hi:.3g}]" for _, lo, hi in cells) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
