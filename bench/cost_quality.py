"""Cost against quality of every way the demo can stain and give intervals, measured in one run.

    OMP_NUM_THREADS=2 python bench/cost_quality.py DEMO [--tiles 512] [--ddpm-tiles 128]
        [--interval-tiles 200] [--paper-samples 20] [--paper-interval-tiles 100] [--batch 64]
        [--device cpu] [--seed 0] [--json cost_quality.json] [--force] [--write]

DEMO is a ``vstain demo`` folder with ``dataset/``, ``heldout/heldout-000.af.ome.tif``
and ``runs/`` holding diffusion, regression, pix2pix and stainnet, and the distill
stage's diffusion-4step, diffusion-2step and diffusion-intervals (any that is missing
is left out, said in the output). Nothing in DEMO is written to (the calibrations run
on copies in a temporary folder).

Stains (same ``--tiles`` test tiles, spread over every test slide, same seed):
the diffusion run with DDPM over its T = 1000 steps (ancestral, the paper's sampler),
DDIM-50 (eta 0) and DPM-Solver++(2M)-10 (the demo's), each distilled run with DDIM over
its own K steps, pix2pix and regression. Per row: network calls per window, seconds
per tile (wall of staining the tiles in batches of ``--batch``), seconds per held-out
slide (``stain_slide`` of the demo's held-out slide), FSD and PFD (StainNet features,
as ``vstain score``) with slide-level 95 % intervals (cluster bootstrap over the test
slides), L1 (0-255), and the ratios to regression. DDPM-1000 costs 100x DPM-Solver++
10: it stains only ``--ddpm-tiles`` of the tiles (a subset spread the same way), and
its slide time is the DDIM-50 slide time x 1000 / 50 (network calls; marked "est.")
unless ``--ddpm-slide``; a second table compares every row on that subset.

Intervals (alpha = delta = 0.1, lambda on ``--interval-tiles`` val tiles, coverage and
mean width on as many test tiles, ``calibrate``'s RCPS): 20 samples x DDIM-50 (the
paper's 20 samples, fewer steps; on ``--paper-interval-tiles`` of each, as it costs
1000 calls per tile), 8 samples x DPM-Solver++ 10 (the demo's), the
interval run's single pass, and the trivial band (+-c around the regression output,
calibrated the same way). Seconds: of the calibration (val + test tiles) and of the
held-out slide's uncertainty maps (20 x 50: the 8 x 10 time x 1000 / 80, "est.").

Prints markdown tables; writes everything to ``--json`` (refused if it exists unless
``--force``); ``--write`` replaces the cost-quality block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- cost-quality:start -->", "<!-- cost-quality:end -->"
HELDOUT = Path("heldout") / "heldout-000.af.ome.tif"
DISTILLED = ("diffusion-4step", "diffusion-2step")
INTERVAL_RUN = "diffusion-intervals"


def methods(runs: Path) -> list[dict[str, Any]]:
    """The staining rows: name, run folder, (sampler, steps, eta), network calls per window."""
    rows = [
        {"name": "DDPM-1000", "run": "diffusion", "sampling": ("ddpm", None, 1.0), "calls": None},
        {"name": "DDIM-50", "run": "diffusion", "sampling": ("ddim", 50, 0.0), "calls": 50},
        {"name": "DPM-Solver++ 10", "run": "diffusion", "sampling": ("dpmpp-2m", 10, 0.0), "calls": 10},
    ]
    for name in DISTILLED:
        cfg = runs / name / "config.json"
        if cfg.is_file():
            k = int(json.loads(cfg.read_text())["distill"]["network_calls"])
            rows.append({"name": f"distilled {k}-step ({name})", "run": name, "sampling": ("ddim", None, 0.0),
                         "calls": k})
    rows += [{"name": "pix2pix", "run": "pix2pix", "sampling": ("ddim", None, 0.0), "calls": 1},
             {"name": "regression", "run": "regression", "sampling": ("ddim", None, 0.0), "calls": 1}]
    return rows


def stain_tiles(runs: Path, row: dict[str, Any], src, args) -> tuple[Any, float]:
    """uint8 tiles of ``row`` on ``src`` (an ImageSet with AF) and the wall seconds it took."""
    from vstain_cli.score import scoring

    sampler, steps, eta = row["sampling"]
    t = time.perf_counter()
    tiles = scoring.sample_run_tiles(runs / row["run"], src, args.device, sampler, steps, eta, args.seed, args.batch)
    return tiles, time.perf_counter() - t


def slide_seconds(af: Path, run: Path, sampling: tuple[str, int | None, float], args, tmp: Path) -> float:
    """Wall seconds of ``stain_slide`` of the held-out slide."""
    from vstain_cli.infer.stain import StainOptions, stain_slide

    sampler, steps, eta = sampling
    out = tmp / f"stain-{time.monotonic_ns()}.tif"
    t = time.perf_counter()
    stain_slide(af, run, out, StainOptions(sampler=sampler, steps=steps, eta=eta, batch_size=args.batch,
                                           device=args.device, seed=args.seed))
    sec = time.perf_counter() - t
    out.unlink(missing_ok=True)
    return sec


def score(real, fakes: dict[str, Any], net, groups, args) -> dict[str, Any]:
    """FSD, PFD, L1 (and the rest ``vstain score`` measures) with slide-level intervals, per fake set."""
    from vstain_cli.score import scoring

    res = scoring.score_image_sets(real.images, fakes, {"FSD": net.features}, n_boot=args.n_boot, seed=args.seed,
                                   fd_boot=args.fd_boot, paired=dict.fromkeys(fakes, True), batch_size=args.batch,
                                   groups=groups)
    return {name: r["metrics"] for name, r in res["models"].items()}


def calibrate(run: Path, dataset: Path, tmp: Path, args, n: int, **kw) -> dict[str, Any]:
    """``calibrate_run`` on a copy of ``run`` (DEMO is never written to): its record, wall seconds, tiles."""
    from vstain_cli.data.store import open_dataset
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    copy = tmp / f"{run.name}-{time.monotonic_ns()}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("state.pt", "samples", "calibration.json"))
    opts = CalibrateOptions(n=n, seed=args.seed, batch_size=args.batch, device=args.device, **kw)
    res = calibrate_run(copy, dataset, opts)
    doc = json.loads(res.path.read_text())
    info = open_dataset(dataset)
    tiles = sum(min(n, len(info.patch_keys(s))) for s in ("val", "test"))
    return {"lam": doc["lam"], "test": doc.get("test_coverage"), "baselines": doc.get("baselines"),
            "seconds": res.seconds, "tiles": tiles, "copy": copy}


def maps_seconds(af: Path, run: Path, args, tmp: Path, **kw) -> float:
    """Wall seconds of ``uncertainty_slide`` of the held-out slide with ``run`` (calibrated)."""
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    t = time.perf_counter()
    uncertainty_slide(af, run, tmp / f"unc-{time.monotonic_ns()}",
                      UncertaintyOptions(batch_size=args.batch, device=args.device, seed=args.seed, **kw))
    return time.perf_counter() - t


def ci(m: dict[str, float] | None, digits: int = 3) -> str:
    if not m:
        return "n/a"
    if m.get("lo") is None or m.get("hi") is None:
        return f"{m['value']:.{digits}g}"
    return f"{m['value']:.{digits}g} [{m['lo']:.{digits}g}, {m['hi']:.{digits}g}]"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def stain_table(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Markdown of the staining rows' metrics ``key`` ("all" or "subset"), with ratios to regression."""
    reg = next(r for r in rows if r["name"] == "regression")
    rm = reg[key]
    lines = ["| method | calls / window | s / tile | s / held-out slide | FSD [95 %] | PFD [95 %] | L1 [95 %] | "
             "x reg. s / tile | x reg. s / slide | x reg. FSD | x reg. PFD | x reg. L1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get(key)
        if m is None:
            continue
        slide = "n/a" if r["s_slide"] is None else f"{r['s_slide']:.1f}" + (" (est.)" if r["slide_estimated"] else "")
        lines.append(
            f"| {r['name']} | {r['calls']} | {r['s_tile']:.4f} | {slide} | {ci(m.get('FSD'))} | {ci(m.get('PFD'))} | "
            f"{ci(m.get('L1'), 4)} | {ratio(r['s_tile'], reg['s_tile'])} | {ratio(r['s_slide'], reg['s_slide'])} | "
            f"{ratio(m['FSD']['value'], rm['FSD']['value'])} | {ratio(m['PFD']['value'], rm['PFD']['value'])} | "
            f"{ratio(m['L1']['value'], rm['L1']['value'])} |")
    return lines


def interval_table(rows: list[dict[str, Any]], reg_tile: float, reg_slide: float | None) -> list[str]:
    lines = ["| intervals | calls / window | lambda or c | test coverage | mean width (0-255) | s calibration "
             "(val + test tiles) | s / held-out slide maps | x reg. s / tile | x reg. s / slide |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("test") or {}
        slide = "n/a" if r.get("s_slide") is None else f"{r['s_slide']:.1f}" + (" (est.)" if r.get("est") else "")
        cov = t.get("coverage")
        per_tile = r["seconds"] / r["tiles"] if r.get("seconds") is not None else r.get("s_tile")
        secs = "n/a" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['name']} | {r['calls']} | {r['lam']:.3g} | {'n/a' if cov is None else f'{cov:.3f}'} | "
                     f"{t.get('mean_width_255', float('nan')):.1f} | {secs} | {slide} | "
                     f"{ratio(per_tile, reg_tile)} | {ratio(r.get('s_slide'), reg_slide)} |")
    return lines


def write_block(text: str) -> None:
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        sys.exit(f"{DOC}: no {START} ... {END} block")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", doc, flags=re.S)
    DOC.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a `vstain demo` folder (dataset/, heldout/, runs/)")
    ap.add_argument("--tiles", type=int, default=512, help="test tiles stained by every method (>= 512 for the doc)")
    ap.add_argument("--ddpm-tiles", type=int, default=128, help="of those, the ones DDPM-1000 stains")
    ap.add_argument("--ddpm-slide", action="store_true", help="stain the held-out slide with DDPM-1000 too "
                    "(else estimated from DDIM-50 by network calls)")
    ap.add_argument("--interval-tiles", type=int, default=200, help="val tiles for lambda and test tiles for coverage")
    ap.add_argument("--paper-samples", type=int, default=20, help="samples of the paper-like interval (x DDIM-50)")
    ap.add_argument("--paper-interval-tiles", type=int, default=100,
                    help="val and test tiles of the 20 x 50 interval (1000 calls per tile: ~5 s per tile on 2 cores)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--fd-boot", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("cost_quality.json"))
    ap.add_argument("--force", action="store_true", help="overwrite --json")
    ap.add_argument("--write", action="store_true", help="replace the cost-quality block of docs/benchmarks.md")
    args = ap.parse_args()

    from vstain_cli.errors import InputError
    from vstain_cli.provenance import record, write_json
    from vstain_cli.score import scoring

    demo, runs, dataset = args.demo, args.demo / "runs", args.demo / "dataset"
    for need in (dataset / "dataset.json", runs / "diffusion", runs / "regression", runs / "stainnet"):
        if not need.exists():
            sys.exit(f"error: {need}: not found (give a finished `vstain demo` folder)")
    if args.json.exists() and not args.force:
        sys.exit(f"error: {args.json}: exists; pass --force to overwrite it")
    if not 2 <= args.ddpm_tiles <= args.tiles:
        sys.exit("error: need 2 <= --ddpm-tiles <= --tiles")
    heldout = demo / HELDOUT
    notes: list[str] = []
    if not heldout.is_file():
        notes.append(f"{heldout} not found: no per-slide seconds")

    real_full = scoring.load_images(dataset, "test")
    real = real_full.take(scoring.select_tiles(len(real_full), args.tiles, args.seed))
    sub_idx = scoring.select_tiles(len(real), args.ddpm_tiles, args.seed)
    real_sub = real.take(sub_idx)
    groups, _ = scoring.dataset_slides(dataset, real.names)
    groups_sub = [groups[i] for i in sub_idx]
    net = scoring.StainNetScorer(runs / "stainnet", args.device)
    rows = methods(runs)
    missing = [n for n in (*DISTILLED, INTERVAL_RUN) if not (runs / n / "config.json").is_file()]
    if missing:
        notes.append(f"not in {runs}: {', '.join(missing)} (run the demo's distill stage)")
    print(f"{demo}: {len(real)} test tiles of {len(set(groups))} slides (DDPM-1000: {len(real_sub)} of them), "
          f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"device {args.device}", flush=True)

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fakes, fakes_sub = {}, {}
        for r in rows:
            if r["name"] == "DDPM-1000":
                tiles, sec = stain_tiles(runs, r, real_sub, args)
                fakes_sub[r["name"]] = tiles
                r["calls"] = int(json.loads((runs / "diffusion" / "config.json").read_text())
                                 ["preset"]["diffusion"]["timesteps"])
                r["s_tile"], r["tiles"] = sec / len(real_sub), len(real_sub)
            else:
                tiles, sec = stain_tiles(runs, r, real, args)
                fakes[r["name"]] = tiles
                fakes_sub[r["name"]] = tiles[sub_idx]
                r["s_tile"], r["tiles"] = sec / len(real), len(real)
            r["s_slide"], r["slide_estimated"] = None, False
            print(f"  stained {r['tiles']} tiles with {r['name']}: {r['s_tile']:.4f} s / tile", flush=True)
        if heldout.is_file():
            for r in rows:
                if r["name"] == "DDPM-1000" and not args.ddpm_slide:
                    continue
                r["s_slide"] = slide_seconds(heldout, runs / r["run"], r["sampling"], args, tmp)
            ddpm, ddim = rows[0], rows[1]
            if ddpm["s_slide"] is None and ddim["s_slide"] is not None:
                ddpm["s_slide"], ddpm["slide_estimated"] = ddim["s_slide"] * ddpm["calls"] / ddim["calls"], True
        all_metrics = score(real, fakes, net, groups, args)
        sub_metrics = score(real_sub, fakes_sub, net, groups_sub, args)
        for r in rows:
            r["all"], r["subset"] = all_metrics.get(r["name"]), sub_metrics.get(r["name"])
        reg = next(r for r in rows if r["name"] == "regression")

        # intervals: lambda on val, coverage and width on test, the same tiles for every source
        ivs: list[dict[str, Any]] = []

        def interval(name: str, calls: int, run: Path, n: int, **kw) -> dict[str, Any] | None:
            try:
                row = {"name": name, "calls": calls, **calibrate(run, dataset, tmp, args, n, **kw)}
            except InputError as e:  # e.g. too few tiles for the risk bound: said, the other sources go on
                notes.append(f"{name}: not calibrated: {e}")
                return None
            ivs.append(row)
            return row

        paper = interval(f"{args.paper_samples} samples x DDIM-50", args.paper_samples * 50, runs / "diffusion",
                         args.paper_interval_tiles, samples=args.paper_samples, sampler="ddim", steps=50)
        # the trivial band around regression is calibrated here (one regression call per tile, 1/80 of the cost)
        demo_cal = interval("8 samples x DPM-Solver++ 10", 80, runs / "diffusion", args.interval_tiles, samples=8,
                            sampler="dpmpp-2m", steps=10, baseline=str(runs / "regression"))
        single = None
        if (runs / INTERVAL_RUN / "config.json").is_file():
            single = interval(f"single pass ({INTERVAL_RUN})", 1, runs / INTERVAL_RUN, args.interval_tiles)
        if heldout.is_file():
            for row in (demo_cal, single):
                if row is not None:
                    row["s_slide"] = maps_seconds(heldout, row["copy"], args, tmp)
            if paper is not None and demo_cal is not None:
                paper["s_slide"], paper["est"] = demo_cal["s_slide"] * paper["calls"] / 80, True
        band = ((demo_cal or {}).get("baselines") or {}).get("baseline_run") or {}
        if band.get("test_coverage"):
            ivs.append({"name": "trivial band +-c around regression", "calls": 1, "lam": band["c"],
                        "test": band["test_coverage"], "matched": band.get("matched"),
                        "seconds": None, "s_tile": reg["s_tile"], "s_slide": reg["s_slide"],
                        "note": "c calibrated with the 8 x 10 run (same tiles); its cost is regression's stain"})
        for iv in ivs:
            iv.pop("copy", None)
    wall = time.perf_counter() - t_all

    text = [f"`python bench/cost_quality.py DEMO --tiles {args.tiles} --ddpm-tiles {args.ddpm_tiles} "
            f"--interval-tiles {args.interval_tiles}` on {platform.machine()} with {os.cpu_count()} CPUs "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, device {args.device}), "
            f"{wall / 60:.0f} min in all. {len(real)} test tiles of {len(set(groups))} slides, 95 % intervals "
            f"resample slides (cluster bootstrap, {args.n_boot} / {args.fd_boot} resamples); "
            f"DDPM-1000 stains {len(real_sub)} of them.", "",
            f"All methods on the {len(real)} tiles (DDPM-1000 is not in this table):", "",
            *stain_table(rows, "all"), "",
            f"All methods on the {len(real_sub)} tiles DDPM-1000 stained (FSD on fewer tiles is biased upwards: "
            "compare within this table):", "",
            *stain_table(rows, "subset"), ""]
    if ivs:
        text += [f"Intervals (alpha = delta = 0.1; lambda on {args.interval_tiles} val tiles, coverage and width on "
                 f"{args.interval_tiles} test tiles, {args.paper_interval_tiles} of each for "
                 f"{args.paper_samples} x 50; ratios: s per tile against regression's stain):", "",
                 *interval_table(ivs, reg["s_tile"], reg["s_slide"]), ""]
        matched = next((iv.get("matched") for iv in ivs if iv.get("matched")), None)
        if matched:
            text += [f"The trivial band at the 8 x 10 intervals' test coverage ({matched['coverage']:.3f}): "
                     f"c = {matched['c']:.2f}, mean width {matched['mean_width_255']:.1f}/255.", ""]
    text += [f"- {n}" for n in notes]
    out = "\n".join(text)
    print(out)
    doc = {"demo": str(demo), "tiles": len(real), "ddpm_tiles": len(real_sub), "slides": len(set(groups)),
           "stain": [{k: v for k, v in r.items()} for r in rows], "intervals": ivs, "notes": notes,
           "wall_seconds": wall, "markdown": out,
           "provenance": record({k: str(v) for k, v in vars(args).items()})}
    write_json(args.json, json.loads(json.dumps(doc, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))))
    print(f"written {args.json}")
    if args.write:
        write_block(out)
        print(f"written the cost-quality block of {DOC}")


if __name__ == "__main__":
    main()
