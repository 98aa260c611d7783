"""Whole-slide staining: tiles/s, overhead over pure model time, seams, memory.

    python bench/stain_speed.py [--model runs/X] [--size 1024] [--steps 10]

Without --model a tiny-diffusion network with random weights is used (timings
and memory are meaningful, seam figures much less so: pass a trained run).

Prints
- tiles/s: 128x128 tiles of slide area stained per second;
- overhead: total stain time / pure network forward time for the same number of
  windows and steps in batches of the same size (target <= 1.15);
- seam ratio: mean |step| across the 128-px tile grid lines / the same across
  interior lines, for joint denoising (default overlap) and for naive
  independent tiles (overlap 0, independent noise per tile);
- peak RSS for two slide sizes (the second 4x the area): must not grow.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _util import peak_rss_mib_of, quick_run


def _read_rgb(path: Path) -> np.ndarray:
    import openslide

    s = openslide.OpenSlide(str(path))
    return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="trained run (default: random tiny-diffusion weights)")
    ap.add_argument("--size", type=int, default=1024, help="phantom slide side in px")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from vstain_cli.data.synth.render import synth
    from vstain_cli.infer.run import load_run
    from vstain_cli.infer.stain import StainOptions, stain_slide
    from vstain_cli.infer.stitch import seam_ratio
    from vstain_cli.io.masks import SlideMask

    tmp = Path(tempfile.mkdtemp(prefix="vstain-bench-"))
    try:
        model = args.model or quick_run(tmp / "run", channels=26)
        run = load_run(model, args.device)
        pairs = synth(tmp / "p", slides=1, size=(args.size, args.size), channels=run.channels, seed=5)
        af = pairs.parent / "phantom-000.af.ome.tif"
        opts = StainOptions(steps=args.steps, batch_size=args.batch_size, device=args.device, compression="zlib")

        t = time.perf_counter()
        res = stain_slide(af, run, tmp / "joint.tif", opts)
        total = time.perf_counter() - t
        tiles = args.size * args.size / run.tile_size**2
        windows = res.stats.windows

        # pure forward time: the same number of windows, same batch size, random inputs
        net = run.model
        b = args.batch_size
        x = torch.randn(b, 3, run.tile_size, run.tile_size, device=run.device)
        cond = run.condition(torch.randn(b, run.channels, run.tile_size, run.tile_size))
        tt = torch.full((b,), 500.0, device=run.device)
        with torch.no_grad():
            net(x, tt, cond)
            t = time.perf_counter()
            done = 0
            while done < windows:
                net(x, tt, cond)
                done += b
        pure = (time.perf_counter() - t) * windows / done

        naive = StainOptions(**{**opts.__dict__, "overlap": 0})
        stain_slide(af, run, tmp / "naive.tif", naive)
        joint_img, naive_img = _read_rgb(tmp / "joint.tif"), _read_rgb(tmp / "naive.tif")
        from vstain_cli.io.slides import open_af

        with open_af(af) as s:
            core = SlideMask(s, run.tile_size).box(0, s.height, 0, s.width)
        print(f"stain: {args.size}^2 px phantom, {run.kind} ({run.path.name}), {args.steps} DDIM steps, "
              f"batch {b}, {args.device}, torch threads {torch.get_num_threads()}")
        print(f"  total {total:.1f} s, {tiles / total:.2f} tiles/s of slide area, "
              f"{windows} window evaluations ({res.stats.regions_background} of {res.stats.regions} regions background)")
        print(f"  pure network time for the same windows {pure:.1f} s -> overhead ratio {total / pure:.3f}")
        for name, img in ((f"joint (overlap {run.tile_size // 4})", joint_img), ("naive independent tiles", naive_img)):
            ys, xs = np.nonzero(core)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = img[y0:y1, x0:x1]
            print(f"  seam ratio, {name:26s} {seam_ratio(crop, run.tile_size, (int(-y0) % run.tile_size, int(-x0) % run.tile_size)):.3f}")

        for size in (args.size, 2 * args.size):
            p = synth(tmp / f"m{size}", slides=1, size=(size, size), channels=run.channels, seed=6)
            code = (f"from vstain_cli.infer.stain import stain_slide, StainOptions; "
                    f"stain_slide({str(p.parent / 'phantom-000.af.ome.tif')!r}, {str(model)!r}, "
                    f"{str(tmp / f'rss{size}.tif')!r}, StainOptions(steps=1, region=256, device='cpu'))")
            print(f"  peak RSS, {size}^2 slide, 256 px regions   {peak_rss_mib_of(code):8.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
