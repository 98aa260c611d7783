"""Run ``vstain demo`` and write its figures into docs/benchmarks.md (between the
``demo-figures`` markers), so the documented numbers always come from a run.

    OMP_NUM_THREADS=2 python bench/demo_figures.py --out /tmp/vstain-demo-bench [--write]

Prints the markdown; with ``--write`` also replaces the block in docs/benchmarks.md.
Timings depend on the machine and on how busy it is; the block says which machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- demo-figures:start -->", "<!-- demo-figures:end -->"


def figures(res, wall: float, cpu: float | None, measured: str = "`python bench/demo_figures.py`") -> str:
    """The markdown block of one demo run (``cpu``: CPU seconds of the process, None when not measured)."""
    from vstain_cli.score.noise_check import sentence
    from vstain_cli.score.report import format_interval as ci
    from vstain_cli.score.table1 import table1_shape

    source = "the bundled runs" if res.bundled else "models trained from scratch in the run (--retrain)"
    if res.bundled and res.fresh_phantom:
        source += ", scored on a phantom made with another seed (no slide seen in training or model selection)"
    minutes, seconds = divmod(round(wall), 60)
    cpu_text = f", {cpu / 60:.0f} min of CPU" if cpu is not None else ""
    lines = [f"Models: {source}. Measured by {measured} on {platform.machine()} with "
             f"{os.cpu_count()} CPUs (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}): "
             f"**{minutes} min {seconds} s** wall{cpu_text}.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res.seconds.items()]
    score = res.score or {}
    n_slides = (score.get("settings") or {}).get("n_slides")
    lines += ["", f"95 % intervals resample the {n_slides} test slides (cluster bootstrap).", "",
              "| model | FSD | PFD | L1 | L2 | PSNR | SSIM | grade accuracy (real) | slides right (real) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in score.get("models", {}).items():
        m, g = r["metrics"], r.get("grade") or {}
        acc = (f"{ci(g['tile_accuracy'], 3)} ({g['real_tile_accuracy']['value']:.3f})" if g else "–")
        right = f"{g['slides_correct']}/{g['slides']} ({g['real_slides_correct']}/{g['slides']})" if g else "–"
        lines.append(f"| {name} | {ci(m.get('FSD'), 1)} | {ci(m.get('PFD'), 2)} | {ci(m.get('L1'), 1)} | "
                     f"{ci(m.get('L2'), 1)} | {ci(m.get('PSNR'), 2)} | {ci(m.get('SSIM'), 3)} | {acc} | {right} |")
    shape = table1_shape(score)
    if shape is not None:
        verdict = "reproduced" if shape["reproduced"] else "NOT reproduced"
        lines += ["", f"Table 1's shape (95 % intervals must not overlap): **{verdict}**.", ""]
        lines += [f"- {'holds' if c['holds'] else 'not shown'}: {c['claim']} — {c['numbers']}" for c in shape["claims"]]
        if shape.get("evidence"):
            lines += ["", "Beyond Table 1:", ""]
            lines += [f"- {'holds' if c['holds'] else 'not shown'}: {c['claim']} — {c['numbers']}"
                      for c in shape["evidence"]]
    if score.get("noise_check"):
        lines += ["", f"Noise check (regression + N(0, 16)): {sentence(score['noise_check'])}."]
    if res.calibration:
        c = res.calibration
        cov = (c.get("test_coverage") or {}).get("coverage")
        lines += ["", f"Calibrated lambda {c['lam']:.2f} (alpha {c['alpha']}, delta {c['delta']})"
                  + (f", test coverage {cov:.3f}." if cov is not None else ".")]
    if res.comparison:
        lines += ["", "Cheaper runs (the demo's own comparison):", ""] + [f"- {line}" for line in res.comparison]
    return "\n".join(lines)


def from_folder(folder: Path):
    """The DemoResult of a finished demo folder (its demo.json, score.json and calibration.json)."""
    import json

    from vstain_cli.demo import DemoResult

    meta = json.loads((folder / "demo.json").read_text())
    cal = folder / "runs" / "diffusion" / "calibration.json"
    return DemoResult(folder, seconds=meta.get("seconds", {}), bundled=bool(meta.get("bundled")),
                      score=json.loads((folder / "score" / "score.json").read_text()),
                      calibration=json.loads(cal.read_text()) if cal.exists() else None,
                      fresh_phantom=bool(meta.get("fresh_phantom")), comparison=list(meta.get("comparison") or []))


def write_grid(report: Path, png: Path, scale: int = 4) -> Path:
    """The report's Fig. 2 examples (AF, target H&E, one column per model) as one PNG, ``scale``x enlarged."""
    import base64
    import io

    import numpy as np
    from skimage.io import imread, imsave

    page = report.read_text()
    part = page[page.index("<h2>Examples</h2>"):]
    part = part[: part.index("</table>")]
    images = [imread(io.BytesIO(base64.b64decode(b)))[..., :3]
              for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", part)]
    cols = len(re.findall(r"<th>[^<]+</th>", part[: part.index("</tr>")]))
    rows = [np.concatenate(images[r * cols:(r + 1) * cols], 1) for r in range(len(images) // cols)]
    grid = np.kron(np.concatenate(rows, 0), np.ones((scale, scale, 1), np.uint8))
    imsave(png, grid, check_contrast=False)
    return png


def write_block(text: str, doc: Path = DOC) -> None:
    """Replace the text between the markers in ``doc``."""
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc}: markers {START} ... {END} not found")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/vstain-demo-bench"))
    ap.add_argument("--write", action="store_true", help="replace the block in docs/benchmarks.md")
    ap.add_argument("--retrain", action="store_true", help="train every model from scratch (vstain demo --retrain)")
    ap.add_argument("--from", dest="src", type=Path, default=None,
                    help="read a finished demo folder instead of running one (e.g. the README's vstain-demo/)")
    ap.add_argument("--phantom-seed", type=int, default=None,
                    help="score the bundled runs on a phantom made with this seed (vstain demo --phantom-seed)")
    ap.add_argument("--grid", type=Path, default=None, help="also write the report's Fig. 2 examples as this PNG")
    ap.add_argument("--wall", type=float, default=None, help="with --from: the wall seconds it took, as measured")
    args = ap.parse_args()
    from vstain_cli.demo import DemoOptions, run_demo

    if args.src is not None:
        res, wall = from_folder(args.src), args.wall
        text = figures(res, wall if wall is not None else sum(res.seconds.values()), None,
                       measured=f"`vstain demo` into `{args.src.name}/`")
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_demo(args.out, DemoOptions(device="cpu", retrain=args.retrain, phantom_seed=args.phantom_seed))
        text = figures(res, time.perf_counter() - t0, time.process_time() - c0)
    print(text)
    if args.grid is not None:
        print(f"Fig. 2 examples: {write_grid(res.out / 'score' / 'report.html', args.grid)}")
    if args.write:
        write_block(text)


if __name__ == "__main__":
    main()
