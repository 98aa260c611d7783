"""Speed and memory of ``vstain uncertainty`` (vstain_cli.uq.maps) vs slide size; interval run vs sampling.

    python bench/uncertainty_speed.py [--size 2048] [--samples 2] [--steps 1] [--region 512] [--device cpu]
    python bench/uncertainty_speed.py --compare-interval [--model phantom-diffusion] [--size 384] [--device cpu]

``--compare-interval``: ``vstain uncertainty`` of one held-out phantom slide (the
demo's recipe: grade 2, ``size``^2 px, the run's channels and µm/px, a seed no run
saw), in a fresh process each, (a) with the diffusion run as calibrated (the
bundled phantom-diffusion: 8 samples x DPM-Solver++(2M) 10 steps, from its
calibration.json) and (b) with an interval run of the same network
(``train.distill.interval_from_teacher``: the Conffusion head on the teacher's
weights, what ``vstain distill --intervals`` fine-tunes; its cost per call is a
trained one's, its bounds are not, so only the seconds are compared). Prints the
seconds of each ``uncertainty_slide`` call, the network calls per window, the
windows evaluated and the speed-up.

AF slides of ``size``^2 px and 4x that area, tissue in 512 px blocks on 25 % of
the slide (the default small slide already fills the AF reader's 64-tile cache),
are mapped with a random-init micro diffusion UNet (the cost per window of a
trained one) in a fresh process each: (2 size)^2 (square, twice as wide) and 4 size x size (tall,
same width). Prints seconds per sample per tissue megapixel and the mapping
process's peak RSS with its ratio to the small slide's. Memory is the N samples
of one region (N x (region + window)^2 x 12 B, independent of the slide), the
blender's float32 rows (about one region row x slide width x 10 channels x 4 B,
with transient copies: grows with the width, docs/architecture.md), thumbnails capped at
1024 px, and the AF tissue-mask thumbnail of ``io.masks.SlideMask`` (8 px per window
along the long side, all AF channels: grows with the area / (window / 8)^2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from vstain_cli.train.presets import Preset, load_preset
from vstain_cli.io.tiff import write_pyramid
from vstain_cli.train.networks import build_network
from vstain_cli.infer.run import Run
from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

mode, height, width, samples, steps, region, device, root = sys.argv[1:9]
height, width, samples, steps, region = int(height), int(width), int(samples), int(steps), int(region)
root = Path(root)
d = load_preset("tiny-diffusion").to_dict()
d["model"].update(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_levels=[])
preset = Preset.from_dict(d, source="<bench micro>")
torch.manual_seed(0)
C, tile = 4, 32
run_dir = root / "run"
run_dir.mkdir(exist_ok=True)
(run_dir / "config.json").write_text("{}")
net = build_network(preset, C).to(device).eval().requires_grad_(False)
run = Run(path=run_dir, config={}, preset=preset, kind="diffusion", channels=C, tile_size=tile, step=0,
          device=torch.device(device), model=net, schedule=preset.diffusion.build_schedule(), prediction="eps",
          af_low=np.full(C, 900, np.float32), af_high=np.full(C, 5000, np.float32))
name = f"{height}x{width}"
af_path = root / f"af{name}.tif"
rng = np.random.default_rng(0)

def strips():
    for y in range(0, height, 256):
        h = min(256, height - y)
        yy, xx = np.mgrid[y:y + h, 0:width]
        tissue = ((yy // 512) % 2 == 0) & ((xx // 512) % 2 == 0)  # 512 px tissue blocks, 25 % of the slide
        a = np.where(tissue[..., None], 3000.0, 100.0) + rng.normal(0, 200, (h, width, C))
        yield np.clip(a, 0, 65535).astype(np.uint16)

if mode == "write":  # in its own process, so the peak RSS below is the mapping's only
    write_pyramid(af_path, strips(), height, width, C, np.uint16, mpp=0.5, compression="zlib", min_level_size=256)
    sys.exit(0)
base_rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
t = time.perf_counter()
res = uncertainty_slide(af_path, run, root / f"unc{name}", UncertaintyOptions(
    samples=samples, steps=steps, region=region, batch_size=64, device=device))
sec = time.perf_counter() - t
print("RESULT", json.dumps({"seconds": sec, "megapixels": height * width / 1e6,
      "tissue_megapixels": res.summary["tissue_pixels"] / 1e6, "windows": res.stats.windows,
      "mean_width_tissue": res.summary["mean_width_tissue"], "base_rss_mib": base_rss,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


COMPARE_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from vstain_cli.infer.run import Run, load_run
from vstain_cli.train.distill import INTERVAL_KIND, interval_from_teacher
from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

kind, af, model, out, region, device = sys.argv[1:7]
run = load_run(model, device)
if kind == "interval":
    folder = Path(out).parent / "interval-run"  # no calibration.json there: lambda = 1 (seconds only)
    folder.mkdir(exist_ok=True)
    net = interval_from_teacher(run.model, run.preset, run.channels).to(run.device).eval().requires_grad_(False)
    run = Run(path=folder, config=run.config, preset=run.preset, kind=INTERVAL_KIND, channels=run.channels,
              tile_size=run.tile_size, step=run.step, device=run.device, model=net, prior=run.prior,
              af_low=run.af_low, af_high=run.af_high)
t = time.perf_counter()
res = uncertainty_slide(af, run, out, UncertaintyOptions(region=int(region), device=device))
sec = time.perf_counter() - t
calls = 1 if res.source == "bounds" else res.samples * res.sampling["steps"]
print("RESULT", json.dumps({"seconds": sec, "windows": res.stats.windows, "calls_per_window": calls,
      "source": res.source, "samples": res.samples, "sampling": res.sampling,
      "mean_width_tissue": res.summary["mean_width_tissue"]}))
"""


def compare_interval(args: argparse.Namespace) -> None:
    """Interval run (one call per window) vs the calibrated diffusion sampling, same slide, one script run."""
    from vstain_cli.data.synth.render import SlideSpec, write_pair
    from vstain_cli.infer.bundled import bundled_path
    from vstain_cli.infer.run import load_run
    from vstain_cli.infer.wholeslide import training_mpp

    run = load_run(bundled_path(args.model) or args.model, "cpu")
    mpp = training_mpp(run) or 1.0
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        af, he = root / "heldout.af.ome.tif", root / "heldout.he.tif"
        write_pair(SlideSpec.random("heldout-bench", 2, args.size, args.size, run.channels, mpp, 7_777_777), af, he,
                   workers=1)
        rows = {}
        for kind in ("diffusion", "interval"):
            proc = subprocess.run([sys.executable, "-c", COMPARE_CHILD, kind, str(af), str(run.path),
                                   str(root / f"unc-{kind}"), str(args.region), args.device],
                                  check=False, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(proc.stderr)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
            rows[kind] = json.loads(line.split(" ", 1)[1])
    d, i = rows["diffusion"], rows["interval"]
    s = d["sampling"]
    print(f"vstain uncertainty of one {args.size}x{args.size} px held-out phantom slide ({run.channels} AF channels, "
          f"{mpp:g} µm/px), {run.path.name} network (base {run.preset.model.base_channels}, "
          f"{run.tile_size} px windows), region {args.region} px, {args.device}, 1 thread")
    # RegionStats.windows counts window evaluations of the network (every step of every sample)
    print(f"  diffusion, {d['samples']} samples x {s['sampler']} {s['steps']} steps: {d['seconds']:.1f} s, "
          f"{d['windows']} window evaluations ({d['windows'] // d['calls_per_window']} windows x "
          f"{d['calls_per_window']} network calls)")
    print(f"  interval run, one pass: {i['seconds']:.1f} s, {i['windows']} window evaluations ({i['windows']} "
          f"windows x 1 network call; half-window overlap as regression, diffusion a quarter)")
    print(f"  speed-up {d['seconds'] / i['seconds']:.1f}x in seconds, {d['windows'] / i['windows']:.1f}x fewer "
          "window evaluations")


def measure(height: int, width: int, args: argparse.Namespace, root: Path) -> dict:
    for mode in ("write", "run"):
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(height), str(width), str(args.samples),
                               str(args.steps), str(args.region), args.device, str(root)], check=False,
                              capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        if proc.returncode:
            sys.exit(proc.stderr)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=None,
                   help="side of the small slide (default 2048; 384, the demo's held-out slide, with --compare-interval)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--region", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare-interval", action="store_true",
                   help="interval run vs the calibrated diffusion sampling on one held-out slide")
    p.add_argument("--model", default="phantom-diffusion", help="diffusion run for --compare-interval")
    args = p.parse_args()
    if args.compare_interval:
        args.size = args.size or 384
        compare_interval(args)
        return
    args.size = args.size or 2048
    s = args.size
    print(f"micro UNet (base 8, 32 px windows), {args.samples} samples x {args.steps} DDIM steps, "
          f"region {args.region} px, {args.device}, 1 thread")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (h, w) in {"small": (s, s), "square x4": (2 * s, 2 * s), "tall x4": (4 * s, s)}.items():
            r = measure(h, w, args, Path(tmp))
            r["s_per_sample_per_mp"] = r["seconds"] / args.samples / r["tissue_megapixels"]
            rows[label] = r
            print(f"{label:>9} {h}x{w} px ({r['megapixels']:.1f} MP, {r['tissue_megapixels']:.1f} MP tissue, "
                  f"{r['windows']} window evals): {r['seconds']:.1f} s = {r['s_per_sample_per_mp']:.2f} s per sample "
                  f"per tissue MP, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB (imports + model {r['base_rss_mib']:.0f} MiB)")
    a = rows["small"]
    for label in ("square x4", "tall x4"):
        b = rows[label]
        print(f"{label}: area x{b['megapixels'] / a['megapixels']:.1f}, time x{b['seconds'] / a['seconds']:.2f}, "
              f"peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.3f} "
              f"(above imports + model: {a['peak_rss_mib'] - a['base_rss_mib']:.0f} -> "
              f"{b['peak_rss_mib'] - b['base_rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
