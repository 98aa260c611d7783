"""Small helpers shared by the bench scripts."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def timed(label: str, results: dict[str, float]) -> Iterator[None]:
    """Store the wall time of the block in ``results[label]``."""
    t = time.perf_counter()
    yield
    results[label] = time.perf_counter() - t


def peak_rss_mib_of(code: str) -> float:
    """Peak resident memory (MiB) of a fresh Python process running ``code``."""
    wrapper = code + "\nimport resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True).stdout
    kib = int([ln for ln in out.splitlines() if ln.startswith("PEAK")][-1].split()[1])
    return kib / 1024


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick_run(folder, channels: int = 26, preset: str = "tiny-diffusion", steps: int = 1):
    """A real run folder trained for ``steps`` steps on a small phantom dataset (for timing)."""
    from pathlib import Path

    from vstain_cli.data.synth.render import synth
    from vstain_cli.data.tiling import TileOptions, tile
    from vstain_cli.train.loop import train
    from vstain_cli.train.presets import load_preset

    folder = Path(folder)
    pairs = synth(folder / "phantom", slides=3, size=(512, 512), channels=channels, seed=11)
    tile(pairs, folder / "dataset", TileOptions(size=128, stride=128, min_tissue=0.3))
    p = load_preset(preset).with_train(steps=steps, batch_size=2, val_every=steps, checkpoint_every=steps)
    train(p, folder / "dataset", folder / "run", device="cpu")
    return folder / "run"
