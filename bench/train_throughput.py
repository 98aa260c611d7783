"""Training throughput (images/s) of the presets at paper size on this machine's CPU.

Usage: python bench/train_throughput.py [--presets diffusion-b ...] [--batch-size 2]
       [--steps 3] [--tile 128] [--channels 26] [--threads N]

Runs the real training step of each preset (train/objectives.py: loss, backward, clip,
AdamW, EMA) on a synthetic batch, fp32 on the CPU, after one warm-up step.
"""

from __future__ import annotations

import argparse
import time

import torch

from vstain_cli.train.networks import count_parameters
from vstain_cli.train.objectives import build_objective
from vstain_cli.train.precision import Amp
from vstain_cli.train.presets import load_preset

PAPER = ["diffusion-b", "diffusion-l", "diffusion-br", "regression", "pix2pix", "stainnet"]


def measure(name: str, batch: int, steps: int, tile: int, channels: int) -> dict[str, float]:
    """Seconds per step and images/s of one preset's training step."""
    cpu = torch.device("cpu")
    preset = load_preset(name).with_train(batch_size=batch)
    torch.manual_seed(0)
    obj = build_objective(preset, channels, cpu, Amp("fp32", cpu))
    g = torch.Generator().manual_seed(0)
    data = {
        "af": torch.rand(batch, channels, tile, tile, generator=g) * 2 - 1,
        "he": torch.rand(batch, 3, tile, tile, generator=g) * 2 - 1,
        "label": torch.randint(0, 4, (batch,), generator=g),
    }
    obj.train(True)
    obj.train_step(data, g)  # warm-up (allocations, kernel selection)
    obj.after_step(0)
    t0 = time.perf_counter()
    for s in range(steps):
        obj.train_step(data, g)
        obj.after_step(s + 1)
    dt = (time.perf_counter() - t0) / steps
    return {"params": count_parameters(obj.nets["net"]), "s_per_step": dt, "images_per_s": batch / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=PAPER)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--channels", type=int, default=26)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU fp32, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.tile} px, "
          f"{args.channels} AF channels, {args.steps} timed steps\n")
    print("| preset | parameters | s/step | images/s |")
    print("|---|---|---|---|")
    for name in args.presets:
        r = measure(name, args.batch_size, args.steps, args.tile, args.channels)
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['s_per_step']:.2f} | {r['images_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
