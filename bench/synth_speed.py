"""Phantom synthesis speed (Mpx/s of slide area) and memory against slide size.

    python bench/synth_speed.py [--size 4096] [--slides 2] [--channels 26]

Prints Mpx/s for `vstain synth`, the same figure for a baseline drawn in the
same run (numpy Gaussian noise for every AF channel alone, no tissue, no
files), their ratio, and peak RSS for two slide sizes (it must not grow with
the slide).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import peak_rss_mib_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--channels", type=int, default=26)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from vstain_cli.data.synth.render import synth

    tmp = Path(tempfile.mkdtemp(prefix="vstain-bench-"))
    try:
        mpx = args.slides * args.size * args.size / 1e6
        t = time.perf_counter()
        synth(tmp / "a", slides=args.slides, size=(args.size, args.size), channels=args.channels, workers=args.workers)
        dt = time.perf_counter() - t
        synth_rate = mpx / dt

        rng = np.random.default_rng(0)
        rows = 256
        t = time.perf_counter()
        for _ in range(0, args.size, rows):
            rng.standard_normal((rows * args.size, args.channels), dtype=np.float32)
        base_rate = args.size * args.size / 1e6 / (time.perf_counter() - t)

        print(f"synth: {args.slides} x {args.size}^2 px, {args.channels} AF channels, {args.workers} workers")
        print(f"  vstain synth                 {synth_rate:8.2f} Mpx/s  ({dt:.1f} s, files written)")
        print(f"  baseline: numpy noise only   {base_rate:8.2f} Mpx/s  (one Gaussian per pixel-channel, no I/O)")
        print(f"  ratio synth / baseline       {synth_rate / base_rate:8.2f}")

        for size in (args.size // 2, args.size):
            code = (f"from vstain_cli.data.synth.render import synth; synth({str(tmp / f'm{size}')!r}, slides=1, "
                    f"size=({size}, {size}), channels={args.channels}, workers={args.workers})")
            print(f"  peak RSS, one {size}^2 slide     {peak_rss_mib_of(code):8.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
