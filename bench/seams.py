"""Seams and overhead of joint canvas denoising (vstain_cli.infer.stitch) vs independent tiles.

    python bench/seams.py [--size 512] [--window 128] [--overlap 32] [--steps 20]

1. Seam ratio (docs/stitching.md) on a size x size canvas, tile period = window, for:
   independent tiles (each its own noise), tiles on one shared noise canvas
   (overlap 0), joint MultiDiffusion denoising (overlap > 0), and joint denoising
   streamed in regions with counter-based noise. The model is the exact denoiser of
   a smooth Gaussian random field computed per window with a periodic assumption
   (wrong at window borders, like a network without context) — a trained stand-in,
   so samples look like real samples of a known distribution.
2. Overhead: a random-init tiny UNet (vstain_cli.nets.unet) sampled on the canvas;
   total time / time of the same window forwards run bare in batches, and total
   time / time spent inside the network during the same run (less sensitive to a
   busy machine); "cost vs tiles" is the price of the extra overlapping windows.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from vstain_cli.diffusion.samplers import sample
from vstain_cli.diffusion.schedule import Schedule
from vstain_cli.infer.stitch import (
    CanvasDenoiser,
    blend_regions,
    noise_canvas,
    region_plan,
    seam_ratio,
    window_grid,
)


def field_denoiser(schedule: Schedule, smooth_px: float = 4.0):
    """eps-model of a unit-variance Gaussian field with a Gaussian spectrum (periodic window)."""
    ac = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
    spectra: dict[tuple[int, int], torch.Tensor] = {}

    def net(x, t, cond):
        key = tuple(x.shape[-2:])
        if key not in spectra:
            fy, fx = np.fft.fftfreq(key[0]), np.fft.fftfreq(key[1])
            s = np.exp(-2 * (np.pi * smooth_px) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
            spectra[key] = torch.as_tensor(s / s.mean(), dtype=torch.float32)
        s = spectra[key]
        a = ac[t.long()].view(-1, 1, 1, 1)
        # E[x0 | x_t] = sqrt(a) S / (a S + 1 - a) X_t in Fourier space (Wiener filter)
        x0 = torch.fft.ifft2(torch.fft.fft2(x) * (a.sqrt() * s / (a * s + 1 - a))).real
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return net


def hwc(z: torch.Tensor) -> np.ndarray:
    return z[0].permute(1, 2, 0).numpy()


def seams(args, schedule: Schedule) -> None:
    net = field_denoiser(schedule)
    n, w = args.size, args.window
    print(f"seam ratio at tile period {w} on a {n}x{n} canvas "
          f"(1.0 = invisible; Gaussian-field stand-in model, {args.steps} steps)")
    print(f"{'sampler':9} {'indep. tiles':>12} {'shared noise':>12} "
          f"{'joint ov=' + str(args.overlap):>12} {'joint ov=' + str(w // 2):>12} {'streamed':>9}")
    for name in ("ddim", "ddpm"):
        gen = lambda k: torch.Generator().manual_seed(args.seed * 1000 + k)  # noqa: E731
        x_T = torch.from_numpy(noise_canvas(args.seed, 0, 0, n, n))[None]
        tiles = torch.zeros_like(x_T)
        for k, (y, x) in enumerate(window_grid(n, n, w, 0)):
            g = gen(k + 1)
            tiles[..., y:y + w, x:x + w] = sample(net, torch.randn(1, 3, w, w, generator=g), schedule, None,
                                                  sampler=name, steps=args.steps, clip_x0=False, generator=g)
        row = [seam_ratio(hwc(tiles), w)]
        for ov in (0, args.overlap, w // 2):
            out = sample(CanvasDenoiser(net, w, ov, 64), x_T, schedule, None, sampler=name,
                         steps=args.steps, clip_x0=False, generator=gen(0))
            row.append(seam_ratio(hwc(out), w))
        region = n // 2
        plan = region_plan(n, n, region, margin=w // 2, window=w)

        def process(r):
            y0, y1, x0, x1 = r.outer
            xr = torch.from_numpy(noise_canvas(args.seed, y0, x0, y1 - y0, x1 - x0))[None]
            return hwc(sample(CanvasDenoiser(net, w, args.overlap, 64), xr, schedule, None, sampler=name,
                              steps=args.steps, clip_x0=False, generator=gen(100 + r.index)))

        streamed = np.concatenate([s for _, s in blend_regions(plan, ((r, process(r)) for r in plan), n, n, 3)])
        row.append(seam_ratio(streamed, w))
        print(f"{name:9} " + " ".join(f"{v:12.3f}" for v in row[:4]) + f" {row[4]:9.3f}")
    print(f"(streamed: regions of {n // 2} px, margin {w // 2}, joint ov={args.overlap}; "
          f"its region borders at {n // 2} are among the measured lines)")


def overhead(args, schedule: Schedule) -> None:
    from vstain_cli.nets.unet import UNet

    torch.manual_seed(args.seed)
    af = 8
    # the tiny-diffusion preset's UNet (16 ch, 3 levels, attention at the deepest)
    net = UNet(af + 3, 3, base_channels=16, channel_mults=[1, 2, 2], num_res_blocks=1,
               attention_levels=[2], attention_heads=1).eval()
    torch.nn.init.normal_(net.out_conv.weight, std=0.01)  # random output, not the zero init
    n, w, steps, bs = args.size, args.window, args.overlap_steps, args.batch
    cond = torch.randn(1, af, n, n)
    x_T = torch.randn(1, 3, n, n)
    xs, ts, cs = torch.randn(bs, 3, w, w), torch.full((bs,), 500.0), torch.randn(bs, af, w, w)

    def bare(count: int) -> float:
        t0 = time.perf_counter()
        for k in range(math.ceil(count / bs)):
            m = min(bs, count - k * bs)
            net(xs[:m], ts[:m], cs[:m])
        return time.perf_counter() - t0

    print(f"\noverhead: random-init tiny UNet, {n}x{n} canvas, window {w}, batch {bs}, "
          f"ddim {steps} steps, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'overlap':>7} {'windows':>8} {'total s':>8} {'bare fwd s':>10} {'total/bare':>10} "
          f"{'total/in-run fwd':>16} {'cost vs tiles':>13}")
    base_total = None
    with torch.no_grad():
        bare(bs)  # warm-up
        for ov in (0, args.overlap, w // 2):
            totals, fwds, bares = [], [], []
            for _ in range(args.repeats):  # interleaved, best of: robust to a busy machine
                model = CanvasDenoiser(net, w, ov, bs)
                t0 = time.perf_counter()
                sample(model, x_T, schedule, cond, sampler="ddim", steps=steps)
                totals.append(time.perf_counter() - t0)
                fwds.append(model.net_seconds)
                bares.append(bare(model.windows_evaluated))
            total, bare_s = min(totals), min(bares)
            base_total = base_total or total
            print(f"{ov:7d} {model.windows_evaluated:8d} {total:8.2f} {bare_s:10.2f} {total / bare_s:10.3f} "
                  f"{min(t / f for t, f in zip(totals, fwds)):16.3f} {total / base_total:13.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="sampler steps for the seam measurements")
    p.add_argument("--overlap-steps", type=int, default=5, help="DDIM steps for the overhead timing")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args()
    schedule = Schedule.make("linear", 1000)
    seams(args, schedule)
    if not args.skip_overhead:
        overhead(args, schedule)


if __name__ == "__main__":
    main()
