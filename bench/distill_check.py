"""Quick check of `vstain distill` runs against their teacher on test tiles (CPU minutes).

    python bench/distill_check.py --dataset DATASET --teacher RUN --stainnet RUN
        [--distilled RUN ...] [--intervals RUN] [--tiles 256] [--samples 8] [--batch 64]

Every sampler stains the same ``--tiles`` test tiles (evenly spread) from the same
starting noise (seed 0): the teacher with DDIM-16 (the distillation's teacher)
and DPM-Solver++(2M)-10 (the demo's sampler), the teacher's own DDIM-4 (what
distillation must beat), each distilled run with its own K
DDIM steps. Printed per row: network calls per tile, FSD to the real H&E (the
StainNet's features; a point estimate, no interval), its ratio to the teacher's
DDIM-16, L1 (0-255) and seconds per tile. For ``--intervals``: raw (uncalibrated)
per-pixel coverage of the real H&E and mean width (0-255) of the interval run and
of the teacher's 5-95 % quantiles of ``--samples`` DPM-Solver++-10 samples.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vstain_cli.data.loader import PatchDataset, spread_indices
from vstain_cli.data.store import open_dataset
from vstain_cli.infer.run import load_run
from vstain_cli.score.metrics import fd_from_features


def _features(stainnet, rgb: torch.Tensor, batch: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([stainnet.features(rgb[i:i + batch]) for i in range(0, len(rgb), batch)]).numpy()


def _stain(run, af: torch.Tensor, batch: int, sampler: str | None, steps: int | None, seed: int) -> torch.Tensor:
    out = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(af), batch):
        kw = {} if sampler is None else {"sampler": sampler, "steps": steps}
        out.append(run.translate(af[i:i + batch], generator=gen, **kw).float().clamp(-1, 1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--stainnet", required=True)
    ap.add_argument("--distilled", nargs="*", default=[])
    ap.add_argument("--intervals")
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()

    info = open_dataset(a.dataset)
    ds = PatchDataset(info, "test", ("af", "he"))
    b = ds.batch(spread_indices(len(ds), a.tiles))
    af, real = b["af"], b["he"]
    stainnet = load_run(a.stainnet).model
    f_real = _features(stainnet, real, a.batch)
    teacher = load_run(a.teacher)

    rows, ref = [], None
    configs = [("teacher DDIM-16", teacher, "ddim", 16, 16), ("teacher DPM-Solver++(2M)-10", teacher, "dpmpp-2m", 10, 10),
               ("teacher DDIM-4 (not distilled)", teacher, "ddim", 4, 4)]
    configs += [(f"{load_run(p).path.name} (distilled, DDIM-{load_run(p).network_calls})", load_run(p), None, None,
                 load_run(p).network_calls) for p in a.distilled]
    for name, run, sampler, steps, calls in configs:
        t0 = time.perf_counter()
        fake = _stain(run, af, a.batch, sampler, steps, seed=0)
        sec = (time.perf_counter() - t0) / len(af)
        fsd = fd_from_features(f_real, _features(stainnet, fake, a.batch)).value
        ref = fsd if ref is None else ref
        l1 = float((fake - real).abs().mean()) * 127.5
        rows.append((name, calls, fsd, fsd / ref, l1, sec))
    print(f"{len(af)} test tiles of {a.dataset}, seed 0, {torch.get_num_threads()} torch thread(s)\n")
    print("| sampler | calls / tile | FSD | FSD / DDIM-16 | L1 (0-255) | s / tile |")
    print("|---|---|---|---|---|---|")
    for name, calls, fsd, ratio, l1, sec in rows:
        print(f"| {name} | {calls} | {fsd:.3f} | {ratio:.2f} | {l1:.2f} | {sec:.4f} |")

    if a.intervals:
        print("\n| intervals (raw, uncalibrated) | calls / tile | pixel coverage | mean width (0-255) | s / tile |")
        print("|---|---|---|---|---|")
        t0 = time.perf_counter()
        draws = torch.stack([_stain(teacher, af, a.batch, "dpmpp-2m", 10, seed=k) for k in range(a.samples)])
        sec = (time.perf_counter() - t0) / len(af)
        lo, hi = torch.quantile(draws, 0.05, dim=0), torch.quantile(draws, 0.95, dim=0)
        _interval_row(f"teacher, 5-95 % of {a.samples} DPM-Solver++-10 samples", 10 * a.samples, lo, hi, real, sec)
        iv = load_run(a.intervals)
        t0 = time.perf_counter()
        parts = [iv.interval(af[i:i + a.batch]) for i in range(0, len(af), a.batch)]
        sec = (time.perf_counter() - t0) / len(af)
        lo, hi = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        _interval_row(f"{iv.path.name} (one call)", 1, lo, hi, real, sec)


def _interval_row(name: str, calls: int, lo: torch.Tensor, hi: torch.Tensor, real: torch.Tensor, sec: float) -> None:
    cov = float(((real >= lo) & (real <= hi)).float().mean())
    width = float((hi - lo).mean()) * 127.5
    print(f"| {name} | {calls} | {cov:.3f} | {width:.1f} | {sec:.4f} |")


if __name__ == "__main__":
    main()
