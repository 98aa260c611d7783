"""Interval runs (`vstain distill --intervals`) in `calibrate` and `uncertainty`, and `uncertainty --scale`.

An oracle interval run gives the bounds mu +- K per pixel (mu = AF channels 0-2 / 2,
as the Gaussian oracle of test_uncertainty_maps), whose calibration and maps are
known in closed form: on H&E drawn from N(mu, SIGMA^2), the centered lambda that
covers 90 % of the values is about 1.645 SIGMA / K, and less for block means. A
real micro interval run, distilled for two steps, goes through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from conftest import assert_one_error_line, make_tiny_dataset, run_cli
from test_calibrate import oracle_dataset, with_mpp
from test_uncertainty_maps import SIGMA, oracle_run, write_af
from torch import nn
from train_helpers import micro

from vstain_cli.data.store import normalize_af
from vstain_cli.errors import InputError
from vstain_cli.infer.run import Run
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.slides import TiffSlide
from vstain_cli.progress import NullProgress
from vstain_cli.train.distill import DistillOptions, distill
from vstain_cli.train.loop import train
from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run
from vstain_cli.uq.compat import CalibrationFile
from vstain_cli.uq.maps import UncertaintyOptions, scale_files, uncertainty_slide

K = 0.5 * SIGMA  # the oracle's half-width in [-1, 1] units: its raw interval under-covers
MPP = 0.5        # the AF slide's and the datasets' µm/px (no resampling)
OPTS = dict(region=256, batch_size=64, device="cpu")


class BoundsOracle(nn.Module):
    """An interval network: (mu - K, mu + K) with mu = cond[:, :3] / 2 (``forward`` gives the midpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, cond: torch.Tensor, bounds: bool = False):
        self.calls += 1
        mu = 0.5 * cond[:, :3]
        return (mu - K, mu + K) if bounds else mu


def bounds_run(path: Path, channels: int = 4, tile: int = 32) -> Run:
    """An interval Run around ``BoundsOracle`` (AF normalised with 900..5000 like the tiny dataset)."""
    base = oracle_run(path, channels, tile)
    return Run(path=path, config={}, preset=base.preset, kind="interval", channels=channels, tile_size=tile, step=0,
               device=torch.device("cpu"), model=BoundsOracle(), af_low=base.af_low, af_high=base.af_high)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("uiv")
    ds = with_mpp(make_tiny_dataset(root / "ds", per_slide=16), MPP)
    train(micro("tiny-diffusion", model={"attention_levels": []}, train={"steps": 2}), ds, root / "teacher",
          device="cpu")
    distill(root / "teacher", root / "iv", DistillOptions(intervals=True, phase_steps=2, batch_size=4,
                                                          checkpoint_every=100, log_every=1, val_batches=1,
                                                          sample_count=2), device="cpu")
    return {"root": root, "ds": ds, "iv": root / "iv", "af": write_af(root / "af.tif"),
            "ods": with_mpp(oracle_dataset(root / "ods"), MPP)}


@pytest.fixture(scope="module")
def oracle_calibrated(env):
    """The bounds oracle calibrated on the oracle dataset at 1, 2 and 8 µm (2, 4 and 16 px blocks)."""
    run = bounds_run(env["root"] / "bounds-oracle")
    res = calibrate_run(run, env["ods"], CalibrateOptions(n=48, interval=None, scales=(1.0, 2.0, 8.0), device="cpu"))
    return run, res


def test_calibrating_an_interval_run_widens_covers_and_records_bounds(oracle_calibrated):
    run, res = oracle_calibrated
    cal = res.calibration
    assert res.source == "bounds" and cal.source == "bounds" and cal.interval == "centered"
    assert cal.center == "midpoint" and cal.samples is None and cal.q_low is None
    # mu +- K under-covers N(mu, SIGMA^2): lambda >= 1.645 SIGMA / K = 3.3 (the HB bound on 48 tiles asks ~98 %)
    assert 3.3 < cal.lam < 6.0, cal.lam
    assert res.test["coverage"] >= 0.9 and res.test["n"] == 48
    assert run.model.calls == 2 * 48 // 16  # one network call per batch of 16 tiles, val and test: no samples
    doc = json.loads(res.path.read_text())
    assert doc["source"] == "bounds" and doc["sampler"] is None and doc["samples"] is None
    assert doc["network_calls"] == 1 and doc["model_kind"] == "interval"
    assert doc["baselines"]["midpoint"]["c"] > 0 and "sample_mean" not in doc["baselines"]
    f = CalibrationFile.read(res.path)
    assert f.sampling()["sampler"] is None
    # block means of independent pixel noise spread less: lambda shrinks with the block (the bounds do not)
    lams = {s.scale_um: s.cal.lam for s in f.scales()}
    assert lams[1.0] < cal.lam and lams[8.0] < lams[2.0] < lams[1.0], lams
    assert all(s.cal.source == "bounds" for s in f.scales())
    for s in doc["scales"]:
        assert s["test_coverage"]["coverage"] >= 0.9, s


def _expected(af_path: Path, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(mu 0-255 (H, W, 3), soft tissue weight (H, W)) of the bounds oracle on the slide."""
    af = tifffile.imread(af_path)
    mu = 0.5 * normalize_af(af.transpose(2, 0, 1), run.af_low, run.af_high)[:3]
    slide = TiffSlide(af_path)
    soft = SlideMask(slide, run.tile_size).soft_box(0, slide.height, 0, slide.width)
    slide.close()
    return (mu.transpose(1, 2, 0) + 1.0) * 127.5, soft


def _block(x: np.ndarray, b: int) -> np.ndarray:
    h, w = x.shape[0] // b, x.shape[1] // b
    return x[:h * b, :w * b].reshape(h, b, w, b, *x.shape[2:]).mean(axis=(1, 3))


def test_interval_run_maps_match_the_calibrated_bounds_per_pixel_and_per_block(env, oracle_calibrated, tmp_path):
    run, res = oracle_calibrated
    f = CalibrationFile.read(res.path)
    out = uncertainty_slide(env["af"], run, tmp_path / "u", UncertaintyOptions(scales=(2.0, 8.0), **OPTS),
                            progress=NullProgress())
    assert out.source == "bounds" and out.samples is None and out.lam == res.calibration.lam
    lower, upper, mean = (tifffile.imread(out.files[k]) for k in ("lower", "upper", "mean"))
    assert (lower <= mean).all() and (mean <= upper).all()
    mu, soft = _expected(env["af"], run)
    inner = soft >= 0.999
    half = out.lam * K * 127.5  # centered: the width x lambda around the midpoint
    assert np.abs(lower[inner] - np.clip(mu[inner] - half, 0, 255)).max() <= 1.0
    assert np.abs(upper[inner] - np.clip(mu[inner] + half, 0, 255)).max() <= 1.0
    assert np.abs(mean[inner] - mu[inner]).max() <= 1.0  # the mean map is the midpoint
    doc = json.loads((out.out / "uncertainty.json").read_text())
    assert doc["source"] == "bounds" and doc["network_calls_per_window"] == 1 and doc["samples"] is None
    for um, b in ((2.0, 4), (8.0, 16)):
        lam = f.scale(um).cal.lam
        names = scale_files(f"{um:g}um", "tiff")
        lo, hi = tifffile.imread(out.out / names["lower"]), tifffile.imread(out.out / names["upper"])
        width = tifffile.imread(out.out / names["width_float"])
        assert lo.shape == hi.shape == (384 // b, 512 // b, 3) and width.shape == (384 // b, 512 // b)
        assert (lo <= hi).all() and (width >= 0).all()
        whole = _block(soft, b) >= 0.999
        m = _block(mu, b)
        assert np.abs(lo[whole] - np.clip(m[whole] - lam * K * 127.5, 0, 255)).max() <= 1.0
        assert np.abs(hi[whole] - np.clip(m[whole] + lam * K * 127.5, 0, 255)).max() <= 1.0
        entry = next(e for e in doc["scales"] if e["scale_um"] == um)
        assert entry["block_px_out"] == b and entry["mpp"] == pytest.approx(MPP * b) and entry["lam"] == lam
        s = entry["summary"]  # tissue blocks: at least half tissue; the fade at the section's edge only widens
        assert s["mean_width_tissue"] >= float(width[whole].mean()) - 0.5 and s["tissue_blocks"] > 0.9 * whole.sum()
        with openslide.OpenSlide(str(out.out / names["lower"])) as o:
            assert float(o.properties["openslide.mpp-x"]) == pytest.approx(MPP * b)
    with pytest.raises(InputError, match=r"has no calibration at --scale 3 µm \(scales calibrated: 1, 2, 8\)"):
        uncertainty_slide(env["af"], run, tmp_path / "x", UncertaintyOptions(scales=(3.0,), **OPTS))
    assert not (tmp_path / "x").exists()


def test_scale_maps_of_samples_narrow_with_the_block(env, tmp_path):
    """A diffusion run (the Gaussian oracle): block means of its samples spread less than its pixels."""
    run = oracle_run(tmp_path / "oracle")
    calibrate_run(run, env["ods"], CalibrateOptions(samples=4, steps=5, n=48, scales=(2.0,), batch_size=48,
                                                    device="cpu"))
    with pytest.raises(InputError, match="calibrates N samples of a diffusion run"):
        uncertainty_slide(env["af"], bounds_run(tmp_path / "b"), tmp_path / "x", UncertaintyOptions(**OPTS),
                          calibration=run.path / "calibration.json")
    out = uncertainty_slide(env["af"], run, tmp_path / "u", UncertaintyOptions(steps=5, scales=(2.0,), **OPTS))
    assert out.source == "samples" and out.samples == 4
    (entry,) = out.scales
    lo, hi = tifffile.imread(entry["files"]["lower"]), tifffile.imread(entry["files"]["upper"])
    assert lo.shape == (96, 128, 3) and (lo <= hi).all()
    assert entry["summary"]["mean_width_tissue"] < out.summary["mean_width_tissue"] / 1.5, (entry, out.summary)
    with pytest.raises(InputError, match="needs a calibration of that scale"):
        uncertainty_slide(env["af"], oracle_run(tmp_path / "bare"), tmp_path / "y",
                          UncertaintyOptions(steps=5, samples=2, scales=(2.0,), **OPTS))


def test_cli_calibrates_and_maps_a_distilled_interval_run(env, tmp_path):
    iv = env["iv"]
    r = run_cli("calibrate", "--model", str(iv), "--data", str(env["ds"]), "--n", "32", "--scale", "2",
                "--scale", "8", "--lambda-max", "100", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "interval run (centered)" in r.stdout and "band +-c around the interval run's midpoint" in r.stdout
    doc = json.loads((iv / "calibration.json").read_text())
    assert doc["source"] == "bounds" and [s["block_px"] for s in doc["scales"]] == [4, 16]
    r = run_cli("uncertainty", str(env["af"]), "--model", str(iv), "--out", str(tmp_path / "u"), "--scale", "8",
                "--samples", "4", "--region", "256", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--samples 4 ignored" in r.stderr and "one pass" in r.stderr
    assert "interval run, one network call per window" in r.stderr and "at 8 µm (16 px blocks" in r.stderr
    lower, upper = tifffile.imread(tmp_path / "u" / "lower.tif"), tifffile.imread(tmp_path / "u" / "upper.tif")
    assert lower.shape == (384, 512, 3) and (lower <= upper).all() and (upper > lower).any()
    lo8, hi8 = tifffile.imread(tmp_path / "u" / "lower.8um.tif"), tifffile.imread(tmp_path / "u" / "upper.8um.tif")
    assert lo8.shape == (24, 32, 3) and (lo8 <= hi8).all()
    assert_one_error_line(
        run_cli("uncertainty", str(env["af"]), "--model", str(iv), "--out", str(tmp_path / "v"), "--scale", "3",
                "--device", "cpu", cwd=tmp_path),
        "calibration.json", "has no calibration at --scale 3 µm (scales calibrated: 2, 8)")
    assert not (tmp_path / "v").exists()
