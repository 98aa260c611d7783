"""lambda in both interval forms on a demo folder, and whole-slide coverage against the real H&E.

Usage (after `vstain demo DEMO ...`):

    OMP_NUM_THREADS=1 python bench/uq_forms_coverage.py /tmp/h2demo [--samples 8] [--steps 10] [--n 96] [--run RUN]

Calibrates a copy of ``DEMO/runs/diffusion`` (or --run) under DEMO/bench-uq/ once (both forms' lambda come
from the same draws), then maps the demo's held-out test slide with each form's calibration
(`vstain uncertainty --reference`, the phantom H&E of that slide) and prints lambda, the tile-level
held-out coverage, and the whole-slide coverage and mean width on tissue.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vstain_cli.provenance import write_json  # noqa: E402
from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run  # noqa: E402
from vstain_cli.uq.intervals import FORMS  # noqa: E402
from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--forms", nargs="+", default=list(FORMS))
    ap.add_argument("--run", type=Path, default=None, help="diffusion run folder (default: DEMO/runs/diffusion)")
    a = ap.parse_args()
    demo = a.demo
    meta = json.loads((demo / "dataset" / "dataset.json").read_text())
    slide = sorted(s for s, e in meta["slides"].items() if e["split"] == "test" and e["patches"])[0]
    af, he = demo / "phantom" / f"{slide}.af.ome.tif", demo / "phantom" / f"{slide}.he.tif"
    work = demo / "bench-uq"
    rows = []
    base = work / "run"
    if not base.exists():
        shutil.copytree(a.run or demo / "runs" / "diffusion", base, ignore=shutil.ignore_patterns("calibration.json"))
    # one calibration: both forms' lambda come from the same draws (calibration.json "forms")
    cal = calibrate_run(base, demo / "dataset", CalibrateOptions(samples=a.samples, steps=a.steps, n=a.n,
                                                                 interval=a.forms[0], device="cpu"), force=True)
    doc = json.loads(cal.path.read_text())
    for form in a.forms:
        f = doc["forms"][form]
        path = work / f"calibration-{form}.json"
        write_json(path, {**doc, "interval": form, "lam": f["lam"], "risk": f["risk"], "ucb": f["ucb"],
                          "test_coverage": f["test_coverage"]})
        res = uncertainty_slide(af, base, work / f"unc-{form}", UncertaintyOptions(steps=a.steps, device="cpu"),
                                calibration=path, reference=he, force=True)
        rows.append((form, f, res))
    print(f"demo {demo}, test slide {slide}, DDIM-{a.steps} eta 0, {a.samples} samples, alpha = delta = 0.1")
    print("| form | lambda | val risk / UCB | test tiles: coverage | test tiles: width | "
          "slide: coverage on tissue | slide: mean width on tissue |")
    print("|---|---|---|---|---|---|---|")
    for form, f, res in rows:
        t, r = f["test_coverage"] or {}, res.reference or {}
        print(f"| {form} | {f['lam']:.2f} | {f['risk']:.3f} / {f['ucb']:.3f} | {t.get('coverage', float('nan')):.3f} | "
              f"{t.get('mean_width_255', float('nan')):.1f} | {r.get('coverage', float('nan')):.3f} | "
              f"{r.get('mean_width_tissue', float('nan')):.1f} |")

if __name__ == "__main__":
    main()
