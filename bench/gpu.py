"""One GPU benchmark, one table: training, sampling and whole-slide staining on CUDA.

Usage (a few minutes of GPU time):

    python bench/gpu.py                    # on a CUDA machine
    python bench/gpu.py --cpu-dry-run      # checks the script on the CPU with tiny settings

Prints, for the machine it runs on (device name, driver, torch and CUDA versions):

1. training throughput (images/s, MFU) of diffusion-b and diffusion-l at batch 16
   and at the largest batch that fits (doubling until out of memory), for fp32 eager
   vs bf16 + channels_last + torch.compile (attention always goes through
   F.scaled_dot_product_attention) — the training step of bench/gpu_train.py;
2. sampling throughput (128 px tiles/s) of the EMA network for DDIM-50 and
   DPM-Solver++-20 at the best batch, bf16 autocast + channels_last;
3. ``vstain stain`` of a synthetic 10k x 10k, 26-channel AF slide made on the
   machine, with DDIM-50: whole-command seconds, the overhead ratio (whole command
   / pure network time inside it) and peak GPU memory; and the same across all
   GPUs through torchrun when the machine has several.

The hardware limit it is compared with: a paper-size UNet forward is ~32 GFLOP per
128 px tile, so DDIM-50 at 40-60 % of a H100/H200's dense bf16 peak (989 TFLOP/s)
is ~250-370 tiles/s, and a 10k x 10k slide (~24k windows at 1/4 overlap) stains in
66-98 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # noqa: E402  (bench/gpu_train.py: the training step timing)


def machine_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU dry run ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "?"
    return (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}, driver {driver}, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def train_rows(preset: str, batch: int, channels: int, tile: int, device, steps: int, warmup: int,
               compile_: bool, peak: float | None) -> list[str]:
    """Table rows for one preset and batch: fp32 eager and bf16 + channels_last (+ compile)."""
    data = gpu_train.make_batch(batch, channels, tile, device)
    setups = [("fp32 eager", "fp32", False, False)]
    if device.type == "cuda":
        setups.append(("bf16 cl compile" if compile_ else "bf16 cl eager", "bf16", True, compile_))
    rows, flops, base = [], None, None
    for label, precision, cl, comp in setups:
        obj = gpu_train.build(preset, batch, channels, device, precision, cl, comp)
        if flops is None:
            flops = gpu_train.count_step_flops(obj, data)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dt = gpu_train.time_steps(obj, data, steps, warmup, device)
        base = base or dt
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        tflops = flops / dt / 1e12
        mfu = f"{100 * tflops / peak:.1f} %" if peak else "?"
        rows.append(f"| train {preset} | {label} | {batch} | {batch / dt:.1f} img/s | {base / dt:.2f}x "
                    f"| {tflops:.1f} TFLOP/s, MFU {mfu} | {mem:.1f} |")
        del obj
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def largest_batch(preset: str, channels: int, tile: int, device, start: int, limit: int) -> int:
    """The largest power-of-two batch (>= start) whose bf16 training step fits in memory."""
    best, batch = start, start
    while batch <= limit:
        try:
            obj = gpu_train.build(preset, batch, channels, device, "bf16", True, False)
            gpu_train.time_steps(obj, gpu_train.make_batch(batch, channels, tile, device), 1, 1, device)
            best = batch
            del obj
        except RuntimeError as e:
            if not is_oom(e):
                raise
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return best


def sampling_rows(preset: str, batch: int, channels: int, tile: int, device) -> list[str]:
    """Tiles/s of DDIM-50 and DPM-Solver++-20 with the preset's network (random weights)."""
    from vstain_cli.diffusion.denoiser import Denoiser
    from vstain_cli.diffusion.samplers import sample
    from vstain_cli.train.networks import build_network
    from vstain_cli.train.presets import load_preset

    p = load_preset(preset)
    net = build_network(p, channels).to(device).eval().requires_grad_(False)
    bf16 = device.type == "cuda"
    if bf16:
        net = net.to(memory_format=torch.channels_last)

    def raw(x, t, c):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, t, c).float()

    den = Denoiser(raw, p.diffusion.prediction)
    schedule = p.diffusion.build_schedule()
    g = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(batch, channels, tile, tile, generator=g, device=device)
    rows = []
    for sampler, steps in (("ddim", 50), ("dpmpp-2m", 20)):
        with torch.no_grad():
            sample(den, torch.randn(batch, 3, tile, tile, generator=g, device=device), schedule, cond,
                   sampler=sampler, steps=2, generator=g)  # warm-up (kernels, allocator)
            gpu_train.sync(device)
            t0 = time.perf_counter()
            sample(den, torch.randn(batch, 3, tile, tile, generator=g, device=device), schedule, cond,
                   sampler=sampler, steps=steps, generator=g)
            gpu_train.sync(device)
        dt = time.perf_counter() - t0
        setup = "bf16 cl" if bf16 else "fp32"
        rows.append(f"| sample {preset} | {sampler}-{steps}, {setup} | {batch} | {batch / dt:.1f} tiles/s "
                    f"| | {steps * batch / dt:.0f} net evals/s | |")
    return rows


def stain_rows(folder: Path, size: int, channels: int, tile: int, preset: str, device, batch: int,
               steps: int) -> list[str]:
    """Whole-slide staining of a synthetic slide: seconds, overhead ratio, peak GPU memory."""
    from vstain_cli.data.synth import synth
    from vstain_cli.data.tiling import TileOptions
    from vstain_cli.data.tiling import tile as tile_dataset
    from vstain_cli.infer.stain import StainOptions, stain_slide
    from vstain_cli.train.loop import train
    from vstain_cli.train.presets import load_preset

    pairs = synth(folder / "phantom", slides=1, size=(size, size), channels=channels, seed=3,
                  workers=min(8, os.cpu_count() or 1))
    af = next((folder / "phantom").glob("*.af.ome.tif"))
    small = synth(folder / "train-phantom", slides=3, size=(4 * tile, 4 * tile), channels=channels, seed=4)
    tile_dataset(small, folder / "dataset", TileOptions(size=tile, stride=tile, min_tissue=0.0))
    run = folder / "run"
    p = load_preset(preset).with_train(steps=1, batch_size=2, val_every=1, checkpoint_every=1)
    train(p, folder / "dataset", run, device=str(device))  # one step: real run folder, timing only
    del pairs
    opts = StainOptions(sampler="ddim", steps=steps, batch_size=batch, device=str(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = stain_slide(af, run, folder / "stained.tif", opts, force=True)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    s = res.stats
    rows = [f"| stain {size}x{size} | ddim-{steps}, 1 process | {batch} | {res.seconds:.1f} s "
            f"| overhead {res.seconds / max(s.net_seconds, 1e-9):.2f}x | {s.windows} windows, "
            f"{s.windows * steps / res.seconds:.0f} net evals/s | {mem:.1f} |"]
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n > 1:
        t0 = time.perf_counter()
        subprocess.run(["torchrun", f"--nproc-per-node={n}", "-m", "vstain_cli", "stain", str(af), "--model",
                        str(run), "--out", str(folder / "stained-ddp.tif"), "--sampler", "ddim", "--steps",
                        str(steps), "--batch-size", str(batch), "--device", "cuda", "--force"], check=True)
        dt = time.perf_counter() - t0
        rows.append(f"| stain {size}x{size} | ddim-{steps}, {n} GPUs (torchrun) | {batch} | {dt:.1f} s "
                    f"| {res.seconds / dt:.2f}x vs 1 GPU | | |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="check the script on the CPU with tiny settings")
    ap.add_argument("--presets", nargs="+", default=None, help="default: diffusion-b diffusion-l")
    ap.add_argument("--slide-size", type=int, default=None, help="stain benchmark slide side in px (default 10000)")
    ap.add_argument("--channels", type=int, default=26)
    ap.add_argument("--max-batch", type=int, default=512, help="largest batch tried for training")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "stain"])
    args = ap.parse_args()

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--cpu-dry-run checks the script on the CPU.", file=sys.stderr)
        return 1
    device = torch.device("cpu") if dry else torch.device("cuda")
    presets = args.presets or (["tiny-diffusion"] if dry else ["diffusion-b", "diffusion-l"])
    tile, steps, warmup = (32, 2, 1) if dry else (128, 10, 3)
    size = args.slide_size or (256 if dry else 10_000)
    channels = 4 if dry else args.channels
    peak = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        peak = gpu_train.peak_tflops(torch.cuda.get_device_name(device))
    print(machine_line(device))
    print("\n| what | set-up | batch | throughput | vs baseline | compute | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    best = {}
    for preset in presets:
        if "train" not in args.skip:
            for row in train_rows(preset, 4 if dry else 16, channels, tile, device, steps, warmup,
                                  not (args.no_compile or dry), peak):
                print(row, flush=True)
            big = 4 if dry else largest_batch(preset, channels, tile, device, 32, args.max_batch)
            best[preset] = big
            if not dry and big > 16:
                for row in train_rows(preset, big, channels, tile, device, steps, warmup, not args.no_compile, peak):
                    print(row, flush=True)
        if "sample" not in args.skip:
            for row in sampling_rows(preset, best.get(preset, 4 if dry else 64), channels, tile, device):
                print(row, flush=True)
    if "stain" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            for row in stain_rows(Path(tmp), size, channels, tile, presets[0], device,
                                  batch=4 if dry else 64, steps=2 if dry else 50):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
