"""Shared fixtures: tiny data made by the code itself."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SVS = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"

# Keep torch/BLAS polite on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_tiny_dataset(
    root: Path,
    channels: int = 4,
    tile: int = 32,
    per_slide: int = 6,
    slides: dict[str, tuple[int, str]] | None = None,
    seed: int = 0,
) -> Path:
    """Write a dataset in the exact format of ``vstain tile`` (see vstain_cli.data.store).

    AF is a deterministic function of the H&E content plus noise, so models can
    learn something. ``slides`` maps slide_id -> (label, split).
    """
    rng = np.random.default_rng(seed)
    slides = slides or {
        "s0": (0, "train"), "s1": (1, "train"), "s2": (2, "train"), "s3": (3, "train"),
        "s4": (1, "val"), "s5": (2, "val"), "s6": (0, "test"), "s7": (3, "test"),
    }
    root = Path(root)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rows = []
    meta_slides = {}
    yy, xx = np.mgrid[0:tile, 0:tile]
    for sid, (label, split) in slides.items():
        he = np.empty((per_slide, 3, tile, tile), np.uint8)
        af = np.empty((per_slide, channels, tile, tile), np.uint16)
        for i in range(per_slide):
            cx, cy, r = rng.uniform(6, tile - 6, 2).tolist() + [rng.uniform(3, 8)]
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).astype(np.float32)
            base = np.array([230, 180, 210], np.float32) - 40 * label
            rgb = base[:, None, None] * (1 - 0.5 * blob)[None] + rng.normal(0, 6, (3, tile, tile))
            he[i] = np.clip(rgb, 0, 255).astype(np.uint8)
            sig = 1000 + 3000 * blob[None] * np.linspace(0.5, 1.5, channels)[:, None, None]
            af[i] = np.clip(sig + rng.normal(0, 50, sig.shape), 0, 65535).astype(np.uint16)
            rows.append([split, sid, i, 32 * i, 0, label, 1.0])
        (root / "slides" / sid).mkdir(exist_ok=True)
        np.save(root / "slides" / sid / "af.npy", af)
        np.save(root / "slides" / sid / "he.npy", he)
        meta_slides[sid] = {"label": label, "split": split, "patches": per_slide}
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "slide_id", "row", "x", "y", "label", "tissue_fraction"])
        w.writerows(rows)
    meta = {
        "format": "vstain-dataset",
        "format_version": 1,
        "channels": channels,
        "af_dtype": "uint16",
        "tile_size": tile,
        "stride": tile,
        "af_normalization": {"method": "percentile", "percentiles": [0.5, 99.5],
                             "low": [900.0] * channels, "high": [5000.0] * channels},
        "slides": meta_slides,
        "created": "test",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A small dataset in ``vstain tile``'s format (4 AF channels, 32 px tiles)."""
    return make_tiny_dataset(tmp_path / "dataset")


@pytest.fixture(scope="session")
def phantom_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small phantom slide pairs (512x640, 5 AF channels) and their pairs.csv."""
    from vstain_cli.data.synth.render import synth

    out = tmp_path_factory.mktemp("phantom")
    return synth(out, slides=6, size=(512, 640), channels=5, mpp=0.5, seed=1)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> Any:
    """Run ``python -m vstain_cli ARGS`` as a real subprocess."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "vstain_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    """One intra-op torch thread for the whole suite: on 2 shared CI cores two
    threads per process run 3-15x slower, and results do not depend on it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_one_error_line(proc: Any, *needles: str) -> None:
    """A CLI subprocess failed on bad input: exit 2, one ``error:`` line naming ``needles``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)


def assert_one_error_result(result: Any, needle: str) -> None:
    """The same for a ``typer.testing.CliRunner`` result."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
