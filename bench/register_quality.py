"""The registration quality bar on phantom pairs: good pairs pass, misregistered ones fail.

    OMP_NUM_THREADS=1 python bench/register_quality.py [--slides 4] [--size 2048] [--seed 0]

Makes phantom pairs with `synth --misregister` (<= 5 deg, <= 200 µm, <= 3 %
scale, 20 µm warp; the range of bench/register_accuracy.py) and, from them,
pairs that cannot be registered: the AF of slide i with the H&E of slide i+1
(`swapped`), the H&E cut into 32 µm squares and shuffled (`scrambled`), the
H&E turned 90° (beyond the ±10° searched, `rot90`) and an H&E that is glass
but for one corner (`blank`). Runs `register_pairs` on all of them and prints
each pair's quality numbers, whether it passed the default bar and, for the
phantom pairs, the error against the recorded truth over AF tissue (as in
bench/register_accuracy.py): a registration is *right* when its median error is
<= 2 µm, and the bar should pass exactly the right ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from register_accuracy import errors_um

from vstain_cli.data.register_pairs import load_registration, register_pairs
from vstain_cli.data.synth.misregister import misregister_pairs
from vstain_cli.data.synth.render import synth
from vstain_cli.data.warp import transform_from_dict
from vstain_cli.io.slides import open_he
from vstain_cli.io.tiff import write_pyramid

RIGHT_UM = 2.0  # median error vs truth of a right registration (the accuracy aim of register_accuracy.py)


def _write(path: Path, img: np.ndarray, mpp: float) -> None:
    img = np.ascontiguousarray(img)
    write_pyramid(path, iter([img]), img.shape[1], img.shape[0], 3, np.uint8, mpp=mpp, compression="zlib")


def bad_he(src: Path, kind: str, folder: Path, mpp: float, seed: int) -> Path:
    """An H&E made from ``src`` that no registration can match to its AF."""
    with open_he(src) as he:
        img = he.read_region(0, 0, he.width, he.height)
    out = folder / f"{src.name.removesuffix('.he.tif')}-{kind}.he.tif"
    if kind == "rot90":
        img = np.rot90(img)
    elif kind == "blank":
        h, w = img.shape[:2]
        corner = img[: h // 5, : w // 5].copy()
        img = np.full_like(img, 245)
        img[: h // 5, : w // 5] = corner
    elif kind == "scrambled":
        c = int(round(32 / mpp))
        h, w = (img.shape[0] // c) * c, (img.shape[1] // c) * c
        cells = img[:h, :w].reshape(h // c, c, w // c, c, 3).swapaxes(1, 2).reshape(-1, c, c, 3)
        cells = cells[np.random.default_rng(seed).permutation(len(cells))]
        img[:h, :w] = cells.reshape(h // c, w // c, c, c, 3).swapaxes(1, 2).reshape(h, w, 3)
    _write(out, img, mpp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="keep the data in this folder")
    args = ap.parse_args()
    mpp = 0.5
    root = args.keep or Path(tempfile.mkdtemp(prefix="vstain-register-quality-"))
    try:
        mis = synth(root / "mis", args.slides, (args.size, args.size), args.channels, mpp, args.seed, force=True)
        misregister_pairs(mis, seed=args.seed, mpp=mpp)
        ids = [f"phantom-{i:03d}" for i in range(args.slides)]
        af = {s: (root / "mis" / f"{s}.af.ome.tif").resolve() for s in ids}
        he = {s: (root / "mis" / f"{s}.he.tif").resolve() for s in ids}
        rows = [(s, af[s], he[s], "good") for s in ids]
        rows.append((f"{ids[0]}-swapped", af[ids[0]], he[ids[1 % len(ids)]], "bad"))
        for k, kind in enumerate(("scrambled", "rot90", "blank")):
            s = ids[k % len(ids)]
            rows.append((f"{s}-{kind}", af[s], bad_he(he[s], kind, root, mpp, args.seed), "bad"))
        (root / "all.csv").write_text("slide_id,af,he,label\n" + "".join(f"{s},{a},{h},0\n" for s, a, h, _ in rows))
        t0 = time.perf_counter()
        result = register_pairs(root / "all.csv", root / "registered", force=True)
        took = time.perf_counter() - t0
        print(f"{len(rows)} pairs {args.size}x{args.size} px at {mpp} µm/px, seed {args.seed}")
        print("| pair | median error vs truth | matched blocks | share | 2nd-pass shift | rotation | scale | bar |")
        print("|---|---|---|---|---|---|---|---|")
        counts = {"right": [0, 0], "wrong": [0, 0], "bad": [0, 0]}  # kind -> [passed, total]
        for s, a, _, kind in rows:
            rec = json.loads((root / "registered" / f"{s}.registration.json").read_text())
            q = rec["quality"]
            err = "-"
            if kind == "good":  # the error of the recorded transform, failed or not, against the truth
                truth = load_registration(root / "mis" / f"{s}.he.truth.json")
                est = transform_from_dict(rec["transform"])  # load_registration refuses a failed record
                e = float(np.median(errors_um(a, est, truth, mpp)))
                kind = "right" if e <= RIGHT_UM else "wrong"
                err = f"{e:.2f} µm ({kind})"
            counts[kind][0] += q["passed"]
            counts[kind][1] += 1
            sh = q["pass2_shift_um_median"]
            print(f"| {s} | {err} | {q['blocks_valid']}/{q['blocks_tissue']} | {q['matched']:.0%} "
                  f"| {'-' if sh is None else f'{sh:.2f} µm'} | {q['rotation_deg']:.2f}° "
                  f"| {q['scale'][0]:.3f}-{q['scale'][1]:.3f} | {'pass' if q['passed'] else 'FAIL'} |")
        (r, nr), (w, nw), (b, nb) = counts["right"], counts["wrong"], counts["bad"]
        print(f"passed: right phantom registrations {r}/{nr}, wrong ones {w}/{nw}, unregistrable pairs {b}/{nb}; "
              f"pairs.csv holds {len(result.passed)} of {len(rows)} rows; register {took:.0f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
