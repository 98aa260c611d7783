"""Sampler sweep: FSD, L1 and calibrated lambda against network evaluations (NFE).

    python bench/sampler_sweep.py --run RUN --dataset DATASET [--stainnet STAINNET]
        [--tiles 16] [--cal-tiles 32] [--samples 4] [--lambda-max-nfe N]
        [--configs ddpm:T,ddpm:250,ddim:10,...] [--png docs/img/sampler_sweep.png] [--force]
    python bench/sampler_sweep.py --demo DEMO ...        # RUN, STAINNET, DATASET of a `vstain demo` folder
    python bench/sampler_sweep.py --run RUN --quick      # a minute-scale smoke run (not for docs)

RUN is any diffusion run folder (``vstain train``); DATASET the ``vstain tile``
folder it was trained on (default: the dataset its config.json names), whose
test split gives the tiles and whose val split calibrates lambda. STAINNET
(default: a ``stainnet`` run next to RUN, e.g. DEMO/runs/stainnet) gives FSD;
without one FSD is "n/a" and only L1 and lambda are measured.

RUN stains ``--tiles`` test tiles with each sampler and step count, and the tiles
are scored against the real H&E with ``vstain_cli.score`` (FSD in the StainNet's
feature space, L1; 95 % intervals as ``vstain score``). Every configuration stains
the same tiles from the same starting noise (``scoring.sample_run_tiles``, one
seed). lambda (the multiplicative form, ``vstain calibrate``'s default) is
calibrated per configuration with ``vstain_cli.uq.calibrate.calibrate_run``
(``--cal-tiles`` validation tiles x ``--samples`` samples, no test check; RCPS
needs 22+ tiles at alpha = delta = 0.1, else lambda is "nan") on a throwaway
copy of the run folder, so RUN/calibration.json is untouched.

``--configs`` items are SAMPLER:STEPS; ``ddpm:T`` is DDPM over the run's T
training steps (the paper's protocol, ``--protocol paper``). The default sweeps
DDPM T and 250, DDIM and DPM-Solver++(2M) at 10/20/50/100. Prints a Markdown
table (sampler, steps, NFE, FSD, its ratio to the DDPM reference, L1, lambda,
seconds per tile) and the goal check of issue 9 (20-step DPM-Solver++ within
10 % of DDPM-T on FSD), and draws FSD, L1 and lambda against NFE into ``--png``
(PIL; provenance in the PNG's text chunk). NFE = steps for all three samplers
(one network call per step). DDPM-T dominates the cost: on a CPU keep
``--tiles`` and ``--samples`` small and set ``--lambda-max-nfe``.

``--quick`` checks the script end to end in a few minutes on a CPU: 4 tiles,
40 calibration tiles x 2 samples, DDPM-20, DDIM and DPM-Solver++ at 5/10,
20 FD subsamples, the plot in the temp folder unless ``--png`` says otherwise.
Its numbers are too noisy for any conclusion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vstain_cli.errors import InputError  # noqa: E402
from vstain_cli.provenance import atomic_output, check_output_file, fingerprint, record  # noqa: E402
from vstain_cli.score import scoring  # noqa: E402

DEFAULT_CONFIGS = ("ddpm:T,ddpm:250,ddim:10,ddim:20,ddim:50,ddim:100,"
                   "dpmpp-2m:10,dpmpp-2m:20,dpmpp-2m:50,dpmpp-2m:100")
QUICK = {"configs": "ddpm:20,ddim:5,ddim:10,dpmpp-2m:5,dpmpp-2m:10", "tiles": 4, "cal_tiles": 40, "samples": 2,
         "fd_boot": 20, "boot": 200}
FULL = {"configs": DEFAULT_CONFIGS, "tiles": 16, "cal_tiles": 32, "samples": 4, "fd_boot": 100, "boot": 1000}
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM-Solver++(2M)"}
COLOURS = {"ddpm": (44, 160, 44), "ddim": (31, 119, 180), "dpmpp-2m": (255, 127, 14)}


def parse_configs(text: str, T: int) -> list[tuple[str, int]]:
    """"SAMPLER:STEPS,..." -> [(sampler, steps)]; STEPS "T" is the run's T; SystemExit on a bad item."""
    out = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        steps = str(T) if steps == "T" else steps
        if name not in LABELS or not steps.isdigit() or not 1 <= int(steps) <= T:
            raise SystemExit(f"--configs: bad item {item!r} (use SAMPLER:STEPS with SAMPLER in {', '.join(LABELS)} "
                             f"and 1 <= STEPS <= T = {T}, or STEPS = T)")
        if (name, int(steps)) not in out:
            out.append((name, int(steps)))
    return out


def resolve_inputs(a: argparse.Namespace) -> tuple[Path, Path, Path | None, int]:
    """(run, dataset, stainnet or None, T) from --run/--dataset/--stainnet or --demo; SystemExit in one line."""
    if a.demo is not None:
        run = a.run or a.demo / "runs" / "diffusion"
        dataset = a.dataset or a.demo / "dataset"
        stainnet = a.stainnet or a.demo / "runs" / "stainnet"
    elif a.run is not None:
        run, dataset, stainnet = a.run, a.dataset, a.stainnet
    else:
        raise SystemExit("give the diffusion run folder with --run (or a `vstain demo` folder with --demo)")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{run}: not a run folder (no config.json)")
    from vstain_cli.train.presets import Preset

    config = json.loads(config_path.read_text())
    preset = Preset.from_dict(config["preset"])
    if preset.kind != "diffusion":
        raise SystemExit(f"{run}: a {preset.kind} run; the sweep needs a diffusion run")
    T = int(preset.diffusion.timesteps)
    if dataset is None:  # the dataset the run was trained on, if it is still there
        root = config.get("dataset", {}).get("root")
        dataset = Path(root) if root else None
        if dataset is None or not (dataset / "dataset.json").is_file():
            raise SystemExit(f"{run}: its training dataset {root} is not there; give one with --dataset")
    if not (dataset / "dataset.json").is_file():
        raise SystemExit(f"{dataset}: not a dataset folder (no dataset.json; make one with `vstain tile`)")
    if stainnet is None and (run.parent / "stainnet" / "config.json").is_file():
        stainnet = run.parent / "stainnet"
    if stainnet is not None and not (stainnet / "config.json").is_file():
        raise SystemExit(f"{stainnet}: not a StainNet run folder (no config.json)")
    return run, dataset, stainnet, T


def calibrate_lambda(run_dir: Path, dataset: Path, sampler: str, steps: int, a) -> float:
    """lambda of ``calibrate_run`` for one sampler setting, on a throwaway copy of the run."""
    from vstain_cli.train.run_folder import CONFIG, WEIGHTS
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        copy.mkdir()
        for f in (CONFIG, WEIGHTS):
            shutil.copy2(run_dir / f, copy / f)
        opts = CalibrateOptions(samples=a.samples, n=a.cal_tiles, sampler=sampler, steps=steps, test_split=None,
                                seed=a.seed, batch_size=a.batch_size, device=a.device)
        try:
            return float(calibrate_run(copy, dataset, opts).calibration.lam)
        except InputError as e:  # e.g. too few tiles for the RCPS bound: report, do not stop the sweep
            print(f"  lambda {sampler}:{steps}: {e}", file=sys.stderr)
            return float("nan")


# ------------------------------------------------------------------ plot (PIL)


def _legend(d, ox: float, oy: float, font) -> None:
    for i, s in enumerate(LABELS):
        d.line([ox + 8, oy + 10 + 16 * i, ox + 24, oy + 10 + 16 * i], fill=COLOURS[s], width=3)
        d.text((ox + 28, oy + 3 + 16 * i), LABELS[s], fill="black", font=font)


def draw_curves(rows: list[dict], path: Path, title: str, meta: dict) -> None:
    """Three panels (FSD with its interval, L1, lambda) against NFE on a log axis."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    panels = [("FSD", "fsd"), ("L1 (0-255)", "l1"), ("lambda", "lam")]
    pw, ph, m = 360, 300, (60, 40, 20, 50)  # panel size; margins left, top, right, bottom
    img = Image.new("RGB", (pw * len(panels), ph + 40), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    d.text((10, 8), title, fill="black", font=font)
    nfe = [r["nfe"] for r in rows]
    x0, x1 = math.log10(min(nfe)) - 0.1, math.log10(max(nfe)) + 0.1
    for p, (label, key) in enumerate(panels):
        ox, oy = p * pw + m[0], 40 + m[1]
        w, h = pw - m[0] - m[2], ph - m[1] - m[3]
        lows = [r.get(key + "_lo", r[key]) for r in rows]
        highs = [r.get(key + "_hi", r[key]) for r in rows]
        finite = [v for v in lows + highs if v is not None and math.isfinite(v)]
        if not finite:  # e.g. FSD without a StainNet, lambda with too few calibration tiles
            d.rectangle([ox, oy, ox + w, oy + h], outline="black")
            d.text((ox, oy - 18), label, fill="black", font=font)
            d.text((ox + w / 2 - 40, oy + h / 2), "not measured", fill="black", font=font)
            if p == 0:
                _legend(d, ox, oy, font)
            continue
        y0, y1 = min(finite), max(finite)
        pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad

        def xy(n, v, ox=ox, oy=oy, w=w, h=h, y0=y0, y1=y1):
            return ox + (math.log10(n) - x0) / (x1 - x0) * w, oy + h - (v - y0) / (y1 - y0) * h

        d.rectangle([ox, oy, ox + w, oy + h], outline="black")
        d.text((ox, oy - 18), label, fill="black", font=font)
        for n in (5, 10, 20, 50, 100, 250, 500, 1000, 2000, 4000):
            if x0 <= math.log10(n) <= x1:
                x, _ = xy(n, y0)
                d.line([x, oy + h, x, oy + h + 4], fill="black")
                d.text((x - 8, oy + h + 6), str(n), fill="black", font=font)
        for k in range(5):
            v = y0 + (y1 - y0) * k / 4
            _, y = xy(10 ** x0, v)
            d.line([ox - 4, y, ox, y], fill="black")
            d.text((p * pw + 4, y - 7), f"{v:.3g}", fill="black", font=font)
        d.text((ox + w / 2 - 70, oy + h + 24), "network evaluations (NFE)", fill="black", font=font)
        for s in LABELS:
            pts = [(r["nfe"], r[key], r.get(key + "_lo"), r.get(key + "_hi")) for r in rows if r["sampler"] == s]
            pts = [q for q in sorted(pts) if q[1] is not None and math.isfinite(q[1])]
            xyp = [xy(n, v) for n, v, _, _ in pts]
            if len(xyp) > 1:
                d.line(xyp, fill=COLOURS[s], width=2)
            for (n, v, lo, hi), (x, y) in zip(pts, xyp):
                if lo is not None and hi is not None:
                    d.line([x, xy(n, lo)[1], x, xy(n, hi)[1]], fill=COLOURS[s])
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[s])
        if p == 0:
            _legend(d, ox, oy, font)
    info = PngInfo()
    info.add_text("provenance", json.dumps(meta, default=str))
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a diffusion run folder (`vstain train`)")
    ap.add_argument("--dataset", type=Path, default=None,
                    help="its `vstain tile` dataset folder (default: the one its config.json names)")
    ap.add_argument("--stainnet", type=Path, default=None,
                    help="StainNet run folder for FSD (default: RUN/../stainnet when it exists)")
    ap.add_argument("--demo", type=Path, default=None,
                    help="a `vstain demo` folder: RUN, DATASET and STAINNET default to its runs and dataset")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (defaults below change; see the top)")
    ap.add_argument("--tiles", type=int, default=None, help=f"test tiles stained per configuration (FSD, L1; "
                    f"default {FULL['tiles']}, quick {QUICK['tiles']})")
    ap.add_argument("--cal-tiles", type=int, default=None, help=f"validation tiles for lambda (0: skip lambda; "
                    f"default {FULL['cal_tiles']}, quick {QUICK['cal_tiles']})")
    ap.add_argument("--samples", type=int, default=None, help=f"diffusion samples per calibration tile "
                    f"(default {FULL['samples']}, quick {QUICK['samples']})")
    ap.add_argument("--lambda-max-nfe", type=int, default=None,
                    help="calibrate lambda only for configurations with at most this many NFE (CPU budget)")
    ap.add_argument("--configs", default=None, help="comma-separated SAMPLER:STEPS, STEPS = T for the run's T "
                    f"(default {FULL['configs']}; quick {QUICK['configs']})")
    ap.add_argument("--fd-boot", type=int, default=None, help="FSD interval subsamples (default 100, quick 20)")
    ap.add_argument("--boot", type=int, default=None, help="L1 bootstrap resamples (default 1000, quick 200)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=None,
                    help="the plot (default docs/img/sampler_sweep.png; quick: the temp folder)")
    ap.add_argument("--force", action="store_true", help="overwrite --png")
    a = ap.parse_args()
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.png is None:
        a.png = Path(tempfile.gettempdir()) / "sampler_sweep.quick.png" if a.quick else Path("docs/img/sampler_sweep.png")
    if a.tiles < 3:
        raise SystemExit("--tiles must be at least 3 (an FD interval needs 3 tiles per set)")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run_dir, dataset, stainnet, T = resolve_inputs(a)
    configs = parse_configs(a.configs, T)
    png = check_output_file(a.png, a.force or a.quick) if a.png else None

    real = scoring.load_images(dataset, split="test")
    real = real.take(scoring.select_tiles(len(real), a.tiles, a.seed))
    extractors = {"FSD": scoring.stainnet_extractor(stainnet, a.device)} if stainnet else {}
    if not stainnet:
        print(f"no StainNet run (--stainnet, or {run_dir.parent / 'stainnet'}): FSD is n/a", file=sys.stderr)
    fakes, seconds, lams = {}, {}, {}
    for sampler, steps in configs:
        key = f"{sampler}:{steps}"
        t = time.perf_counter()
        fakes[key] = scoring.sample_run_tiles(run_dir, real, a.device, sampler, steps, seed=a.seed,
                                              batch_size=a.batch_size)
        seconds[key] = (time.perf_counter() - t) / len(real)
        t = time.perf_counter()
        cal = a.cal_tiles and (a.lambda_max_nfe is None or steps <= a.lambda_max_nfe)
        lams[key] = calibrate_lambda(run_dir, dataset, sampler, steps, a) if cal else float("nan")
        print(f"  {key}: {seconds[key]:.2f} s/tile staining, lambda {lams[key]:.3f} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    res = scoring.score_image_sets(real.images, fakes, extractors, n_boot=a.boot, seed=a.seed,
                                   fd_boot=a.fd_boot, paired={k: True for k in fakes}, batch_size=64)
    rows = []
    for sampler, steps in configs:
        key = f"{sampler}:{steps}"
        m = res["models"][key]["metrics"]
        row = {"sampler": sampler, "steps": steps, "nfe": steps, "lam": lams[key], "s_per_tile": seconds[key]}
        for k in ("fsd", "l1"):
            iv = m.get(k.upper())
            row.update({k: iv["value"], f"{k}_lo": iv["lo"], f"{k}_hi": iv["hi"]} if iv else
                       {k: None, f"{k}_lo": None, f"{k}_hi": None})
        rows.append(row)
    ddpm = [r for r in rows if r["sampler"] == "ddpm"]
    ref = max(ddpm, key=lambda r: r["steps"]) if ddpm else None  # the reference: DDPM with the most steps
    ref_name = f"DDPM-{ref['steps']}" if ref else "DDPM"

    def num(v, fmt):
        return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)

    print(f"\n{run_dir} (T = {T}) on {dataset}: {len(real)} test tiles of {real.images.shape[-1]} px, "
          f"FSD/L1 95 % intervals ({a.fd_boot} subsamples / {a.boot} bootstrap); lambda (multiplicative) from "
          f"{a.cal_tiles} val tiles x {a.samples} samples; {platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, device {a.device}{', QUICK' if a.quick else ''}\n")
    print(f"| sampler | steps | NFE | FSD [95 %] | FSD / {ref_name} | L1 [95 %] | lambda | s / tile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['fsd'] / ref['fsd']:.2f}" if ref and r["fsd"] is not None and ref["fsd"] else "-")
        fsd = "n/a" if r["fsd"] is None else f"{r['fsd']:.3g} [{num(r['fsd_lo'], '.3g')}, {num(r['fsd_hi'], '.3g')}]"
        l1 = f"{r['l1']:.2f} [{num(r['l1_lo'], '.2f')}, {num(r['l1_hi'], '.2f')}]"
        print(f"| {LABELS[r['sampler']]} | {r['steps']} | {r['nfe']} | {fsd} | {ratio} | {l1} "
              f"| {num(r['lam'], '.3f')} | {r['s_per_tile']:.3f} |")
    goal = next((r for r in rows if r["sampler"] == "dpmpp-2m" and r["steps"] == 20), None)
    if ref and ref["steps"] == T and goal and ref["fsd"]:
        ratio = goal["fsd"] / ref["fsd"]
        verdict = "met" if ratio <= 1.10 else "missed"
        print(f"\nGoal (issue 9): 20-step DPM-Solver++ FSD within 10 % of DDPM-{T}: {goal['fsd']:.4g} vs "
              f"{ref['fsd']:.4g}, ratio {ratio:.3f} -> {verdict}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    if png:
        inputs = {"weights": fingerprint(run_dir / "weights.safetensors"),
                  "dataset.json": fingerprint(dataset / "dataset.json")}
        if stainnet:
            inputs["stainnet"] = fingerprint(stainnet / "weights.safetensors")
        meta = record(vars(a), inputs)
        meta["rows"] = rows
        draw_curves(rows, png, f"Sampler sweep{' (quick)' if a.quick else ''}: {len(real)} test tiles of "
                    f"{run_dir.name}, lambda from {a.cal_tiles} x {a.samples} samples", meta)
        print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
