"""Whole-slide staining: stitched without seams, deterministic, streamed, real pyramids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from conftest import REPO, assert_one_error_line, run_cli
from torch import nn

from vstain_cli.diffusion.schedule import Schedule
from vstain_cli.infer.run import Run
from vstain_cli.infer.stain import StainOptions, stain_slide
from vstain_cli.io.slides import TiffSlide
from vstain_cli.io.tiff import write_pyramid
from vstain_cli.train.presets import load_preset

CHANNELS = 4


def _af_slide(path: Path, h: int = 300, w: int = 420, seed: int = 0) -> Path:
    """A smooth AF 'section' (bright ellipse with texture) on dark glass, 4 channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    base = 200 + inside * (1800 + 600 * np.sin(xx / 23) * np.cos(yy / 17))
    af = np.stack([base * (0.6 + 0.2 * c) for c in range(CHANNELS)], axis=2) + rng.normal(0, 5, (h, w, CHANNELS))
    af = np.clip(af, 0, 65535).astype(np.uint16)
    write_pyramid(path, iter([af]), h, w, CHANNELS, np.uint16, mpp=0.5, compression="zlib", subifds=True,
                  min_level_size=64, ome_channels=[f"c{i}" for i in range(CHANNELS)])
    return path


class OracleEps(nn.Module):
    """eps prediction that makes x0 = the first three AF channels (identity-like staining)."""

    def __init__(self, schedule: Schedule):
        super().__init__()
        self.abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)

    def forward(self, x_t, t, cond):
        a = self.abar[t.long()].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * cond[:, :3]) / (1 - a).sqrt()


class FirstChannels(nn.Module):
    def forward(self, cond):
        return cond[:, :3]


def _run(tmp_path: Path, kind: str = "diffusion") -> Run:
    folder = tmp_path / f"run-{kind}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"kind": kind}))
    sched = Schedule.make("linear", 1000)
    low, high = np.full(CHANNELS, 200, np.float32), np.full(CHANNELS, 3000, np.float32)
    if kind == "diffusion":
        return Run(folder, {}, load_preset("tiny-diffusion"), "diffusion", CHANNELS, 32, 0, torch.device("cpu"),
                   OracleEps(sched), sched, "eps", False, None, low, high)
    return Run(folder, {}, load_preset("tiny-regression"), "regression", CHANNELS, 32, 0, torch.device("cpu"),
               FirstChannels(), af_low=low, af_high=high)


def _expected(af_path: Path, run: Run) -> np.ndarray:
    with TiffSlide(af_path) as s:
        af = s.read_region(0, 0, s.width, s.height).transpose(2, 0, 1)
    x = run.normalize(af)[:3]
    return ((x + 1) * 127.5).transpose(1, 2, 0)


def _read(path: Path) -> np.ndarray:
    s = openslide.OpenSlide(str(path))
    return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("kind", ["diffusion", "regression"])
@pytest.mark.parametrize("region", [96, 1024])
def test_identity_model_reproduces_its_input_without_seams(tmp_path, kind, region):
    af = _af_slide(tmp_path / "af.tif")
    run = _run(tmp_path, kind)
    out = tmp_path / "st.tif"
    res = stain_slide(af, run, out, StainOptions(steps=5, region=region, compression="zlib", batch_size=8))
    got = _read(out)
    want = _expected(af, run)
    with TiffSlide(af) as s:
        from vstain_cli.io.masks import SlideMask

        m = SlideMask(s, 32)
        tissue = m.box(0, s.height, 0, s.width)
    from scipy.ndimage import binary_erosion

    core = binary_erosion(tissue, iterations=40)
    assert core.sum() > 20_000
    assert np.abs(got - want)[core].max() <= 1.0  # exact up to rounding
    far_glass = binary_erosion(~tissue, iterations=70, border_value=1)  # no window with tissue reaches it
    assert far_glass.sum() > 1000 and (got[far_glass] >= 254).all()  # white, without model calls
    assert res.stats.regions >= (12 if region == 96 else 1)


def test_pyramid_opens_with_levels_mpp_provenance_and_thumbnail(tmp_path):
    af = _af_slide(tmp_path / "af.tif", 700, 600)
    out = tmp_path / "st.tif"
    res = stain_slide(af, _run(tmp_path), out, StainOptions(steps=3, compression="jpeg"))
    s = openslide.OpenSlide(str(out))
    assert s.level_count == 2 and s.dimensions == (600, 700)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    from vstain_cli.io.tiff import read_provenance

    prov = read_provenance(out)
    assert prov["config"]["stain"]["sampler"] == "ddim" and prov["inputs"]["af"]["bytes"] > 0
    assert res.thumbnail.exists() and res.thumbnail.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A real diffusion run (micro preset, 2 steps) on a tiny 4-channel dataset."""
    from conftest import make_tiny_dataset
    from train_helpers import micro

    from vstain_cli.train.loop import train

    root = tmp_path_factory.mktemp("micro")
    data = make_tiny_dataset(root / "dataset", channels=CHANNELS)
    preset = micro("tiny-diffusion", train={"steps": 2, "batch_size": 2})
    train(preset, data, root / "run", device="cpu")
    return root / "run"


def test_same_seed_same_slide_bit_for_bit(tmp_path, micro_run):
    af = _af_slide(tmp_path / "af.tif", 200, 260)
    opts = dict(sampler="ddpm", steps=4, compression="zlib", region=128)
    a, b, c = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    stain_slide(af, micro_run, a, StainOptions(seed=3, **opts))
    stain_slide(af, micro_run, b, StainOptions(seed=3, **opts))
    stain_slide(af, micro_run, c, StainOptions(seed=4, **opts))
    assert np.array_equal(_read(a), _read(b))
    assert not np.array_equal(_read(a), _read(c))


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path, micro_run):
    af = _af_slide(tmp_path / "af.tif", 200, 260)
    one = tmp_path / "one.tif"
    args = ["stain", str(af), "--model", str(micro_run), "--steps", "3", "--region", "96", "--device", "cpu"]
    assert run_cli(*args, "--out", str(one)).returncode == 0
    two = tmp_path / "two.tif"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-port", "29561", "-m", "vstain_cli", *args, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(_read(one), _read(two))
    assert not list(tmp_path.glob(".*shards*"))


def test_bad_inputs(tmp_path, micro_run):
    af = _af_slide(tmp_path / "af.tif", 200, 260)
    out = tmp_path / "out.tif"
    # channel mismatch
    wrong = tmp_path / "af6.tif"
    write_pyramid(wrong, iter([np.full((128, 128, 6), 2000, np.uint16)]), 128, 128, 6, np.uint16, compression="zlib")
    assert_one_error_line(run_cli("stain", str(wrong), "--model", str(micro_run), "--out", str(out)), "af6.tif", "6 channels")
    # missing and corrupt checkpoints
    assert_one_error_line(run_cli("stain", str(af), "--model", str(tmp_path / "nope"), "--out", str(out)), "nope")
    broken = tmp_path / "broken-run"
    broken.mkdir()
    for f in micro_run.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "weights.safetensors").write_bytes(b"\x00" * 64)
    assert_one_error_line(run_cli("stain", str(af), "--model", str(broken), "--out", str(out)), "weights.safetensors")
    # slide without tissue
    glass = tmp_path / "glass.tif"
    write_pyramid(glass, iter([np.full((128, 128, CHANNELS), 180, np.uint16)]), 128, 128, CHANNELS, np.uint16,
                  compression="zlib")
    assert_one_error_line(run_cli("stain", str(glass), "--model", str(micro_run), "--out", str(out)), "glass.tif", "no tissue")
    # unknown sampler, output == input, existing output
    assert_one_error_line(run_cli("stain", str(af), "--model", str(micro_run), "--out", str(out), "--sampler", "euler"),
              "unknown sampler")
    assert_one_error_line(run_cli("stain", str(af), "--model", str(micro_run), "--out", str(af)), "is the input")
    out.write_bytes(b"x")
    assert_one_error_line(run_cli("stain", str(af), "--model", str(micro_run), "--out", str(out)), "--force")
    assert out.read_bytes() == b"x"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
