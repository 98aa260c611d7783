"""Registration accuracy against phantom ground truth, and what `tile` keeps afterwards.

    OMP_NUM_THREADS=1 python bench/register_accuracy.py [--slides 2] [--size 2048] [--seed 0]

Makes phantom pairs twice with the same seed — co-registered, and with
`synth --misregister` (<= 5 deg rotation, <= 200 µm shift, <= 3 % scale,
20 µm smooth local warp, recorded in <id>.he.truth.json) — runs `register` on
the misregistered pairs and prints, per slide, the error |T_est(p) - T_true(p)|
in µm over AF tissue (the tissue mask of a 1/8 thumbnail: one point per 8 x 8
pixels), then tiles the clean pairs and the registered pairs (`tile --size 128
--stride 128 --min-tissue 0.5 --max-shift 3`) and compares the patch counts.
The misregistered H&E lies on a canvas that holds all of the moved section, so
every clean patch has its H&E somewhere on the H&E slide.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vstain_cli.data.register_pairs import load_registration, register_pairs
from vstain_cli.data.synth.misregister import misregister_pairs
from vstain_cli.data.synth.render import synth
from vstain_cli.data.tiling import TileOptions, tile
from vstain_cli.data.warp import transform_from_dict
from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.io.slides import open_af


def errors_um(af_path: Path, est, truth, mpp: float) -> np.ndarray:
    with open_af(af_path) as af:
        thumb, ds = af.thumbnail(max(af.width, af.height) // 8, channel_sum=True)
        mask = tissue_mask_af(thumb, channels=af.channels)
    yy, xx = np.nonzero(mask)
    x, y = xx * ds + (ds - 1) / 2, yy * ds + (ds - 1) / 2
    ut, vt = truth.map(x, y)
    ue, ve = est.map(x, y)
    return np.hypot(ue - ut, ve - vt) * mpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="keep the data in this folder")
    args = ap.parse_args()
    mpp = 0.5
    root = args.keep or Path(tempfile.mkdtemp(prefix="vstain-register-bench-"))
    try:
        hw = (args.size, args.size)
        clean = synth(root / "clean", args.slides, hw, args.channels, mpp, args.seed, force=True)
        mis = synth(root / "mis", args.slides, hw, args.channels, mpp, args.seed, force=True)
        misregister_pairs(mis, seed=args.seed, mpp=mpp)
        t0 = time.perf_counter()
        reg_csv = register_pairs(mis, root / "registered", force=True).pairs_csv
        t_reg = time.perf_counter() - t0
        opts = TileOptions(size=128, stride=128, min_tissue=0.5)
        ds_clean = tile(clean, root / "ds-clean", opts, force=True)
        ds_reg = tile(reg_csv, root / "ds-registered", opts, force=True)
        all_err = []
        print(f"{args.slides} phantom pairs {args.size}x{args.size} px at {mpp} µm/px, seed {args.seed}; "
              f"register took {t_reg:.1f} s in all")
        print("| slide | rotation | shift | warp | error median | p95 | max | patches clean | registered | kept "
              "| dropped > 3 µm | off the H&E |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rc, rr in zip(ds_clean.slides, ds_reg.slides):
            sid = rc.slide_id
            tr = json.loads((root / "mis" / f"{sid}.he.truth.json").read_text())
            truth = transform_from_dict(tr["transform"])
            est = load_registration(root / "registered" / f"{sid}.registration.json")
            err = errors_um(root / "mis" / f"{sid}.af.ome.tif", est, truth, mpp)
            all_err.append(err)
            p = tr["misregister"]
            print(f"| {sid} | {p['rotation_deg']:.2f}° | {np.hypot(*p['shift_um']):.0f} µm | {p['warp_um_max']:.0f} µm "
                  f"| {np.median(err):.2f} µm | {np.percentile(err, 95):.2f} µm | {err.max():.2f} µm "
                  f"| {rc.patches} | {rr.patches} | {rr.patches / max(rc.patches, 1):.1%} "
                  f"| {rr.alignment.get('dropped', 0)} | {rr.alignment.get('off_slide', 0)} |")
        e = np.concatenate(all_err)
        n_clean = sum(r.patches for r in ds_clean.slides)
        n_reg = sum(r.patches for r in ds_reg.slides)
        print(f"all slides: error median {np.median(e):.2f} µm, p95 {np.percentile(e, 95):.2f} µm, "
              f"max {e.max():.2f} µm over {len(e)} tissue points (aim <= 2 and <= 5); tile keeps "
              f"{n_reg}/{n_clean} = {n_reg / max(n_clean, 1):.1%} of the clean pairs' patches (aim >= 95 %)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
