"""GPU training benchmark: bf16 + channels_last + torch.compile vs fp32 eager, with MFU.

Usage: python bench/gpu_train.py [--preset diffusion-l] [--batch-size 16] [--tile 128]
       [--channels 26] [--steps 20] [--warmup 5] [--peak-tflops T] [--no-compile]
       [--cpu-dry-run]

Times the real training step (train/objectives.py: loss, backward, clip, AdamW, EMA)
of one preset on a synthetic batch in three set-ups, in the same process:

  1. fp32 eager (TF32 off: the plain-fp32 baseline),
  2. bf16 autocast + channels_last, eager,
  3. bf16 autocast + channels_last + torch.compile.

Attention always runs through F.scaled_dot_product_attention (fused flash /
memory-efficient kernels on CUDA). FLOPs of one step (forward + backward) are
counted with torch.utils.flop_counter.FlopCounterMode on the eager model; MFU is
achieved FLOP/s over the GPU's dense bf16 tensor-core peak (``--peak-tflops`` or
a table of known GPUs). Without CUDA it exits with a message (``--cpu-dry-run``
runs the same code on a tiny preset on the CPU to check the script itself).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vstain_cli.train.networks import count_parameters
from vstain_cli.train.objectives import build_objective
from vstain_cli.train.precision import Amp
from vstain_cli.train.presets import load_preset

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(name: str) -> float | None:
    """Known dense bf16 peak for a device name (longest matching key wins)."""
    hits = [k for k in PEAK_BF16_TFLOPS if k in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def make_batch(batch: int, channels: int, tile: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "af": (torch.rand(batch, channels, tile, tile, generator=g) * 2 - 1).to(device),
        "he": (torch.rand(batch, 3, tile, tile, generator=g) * 2 - 1).to(device),
        "label": torch.randint(0, 4, (batch,), generator=g).to(device),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset_name: str, batch: int, channels: int, device: torch.device, precision: str, channels_last: bool,
          compile_: bool):
    preset = load_preset(preset_name).with_train(batch_size=batch)
    preset.train.channels_last = channels_last
    torch.manual_seed(0)
    obj = build_objective(preset, channels, device, Amp(precision, device))
    if compile_:
        obj.wrap(torch.compile)
    obj.train(True)
    return obj


def count_step_flops(obj, data) -> int:
    """FLOPs of one training step (forward + backward; the optimizer is not counted)."""
    with FlopCounterMode(display=False) as fc:
        obj.train_step(data, torch.Generator(device=data["he"].device).manual_seed(1))
    return int(fc.get_total_flops())


def time_steps(obj, data, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per training step after ``warmup`` untimed steps."""
    g = torch.Generator(device=device).manual_seed(2)
    for i in range(warmup):
        obj.train_step(data, g)
        obj.after_step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        obj.train_step(data, g)
        obj.after_step(warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="default: diffusion-l (tiny-diffusion with --cpu-dry-run)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (4 with --cpu-dry-run)")
    ap.add_argument("--tile", type=int, default=None, help="default: 128 (32 with --cpu-dry-run)")
    ap.add_argument("--channels", type=int, default=26)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile set-up")
    ap.add_argument("--cpu-dry-run", action="store_true", help="check the script on the CPU (tiny, fp32 only)")
    args = ap.parse_args()

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("bench/gpu_train.py needs a CUDA GPU, and torch.cuda.is_available() is False here.\n"
              "Run it on a GPU machine; for CPU numbers use bench/train_throughput.py "
              "(or --cpu-dry-run to check this script).", file=sys.stderr)
        return 1
    device = torch.device("cpu") if dry else torch.device("cuda")
    preset = args.preset or ("tiny-diffusion" if dry else "diffusion-l")
    batch = args.batch_size or (4 if dry else 16)
    tile = args.tile or (32 if dry else 128)
    steps, warmup = (2, 1) if dry else (args.steps, args.warmup)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or peak_tflops(name)
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 baseline
        torch.backends.cudnn.allow_tf32 = False
    else:
        name, peak = "CPU (dry run)", args.peak_tflops
    data = make_batch(batch, args.channels, tile, device)

    setups = [("fp32 eager", "fp32", False, False)]
    if dry:
        setups.append(("fp32 channels_last eager", "fp32", True, False))
    else:
        setups.append(("bf16 channels_last eager", "bf16", True, False))
        if not args.no_compile:
            setups.append(("bf16 channels_last compile", "bf16", True, True))

    print(f"{name}; preset {preset}, batch {batch}, {tile} px, {args.channels} AF channels; "
          f"peak {peak or '?'} TFLOP/s bf16 dense")
    flops = None
    rows = []
    for label, precision, cl, comp in setups:
        obj = build(preset, batch, args.channels, device, precision, cl, comp)
        if flops is None:
            flops = count_step_flops(obj, data)
            print(f"parameters {count_parameters(obj.nets['net']) / 1e6:.2f}M; "
                  f"{flops / 1e9:.1f} GFLOP per training step (forward + backward)")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dt = time_steps(obj, data, steps, warmup, device)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((label, dt, mem))
        del obj
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = rows[0][1]
    print("\n| set-up | ms/step | images/s | speed-up vs fp32 eager | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, dt, mem in rows:
        achieved = flops / dt / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "?"
        print(f"| {label} | {dt * 1e3:.1f} | {batch / dt:.1f} | {base / dt:.2f}x | {achieved:.2f} | {mfu} "
              f"| {mem:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
