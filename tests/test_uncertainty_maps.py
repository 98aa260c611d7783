"""``vstain uncertainty``: streamed, calibrated credible-interval maps of a whole slide.

Most checks use an oracle "network": the exact eps-denoiser of x0 ~ N(mu, s^2)
per pixel with mu = AF channels 0-2 / 2, so the samples have a known, non-
degenerate spread and a known mean. The CLI runs use a micro run trained for
two steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from conftest import assert_one_error_result, make_tiny_dataset, run_cli
from torch import nn
from train_helpers import micro
from typer.testing import CliRunner

from vstain_cli.cli.main import app
from vstain_cli.data.store import normalize_af
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.infer.run import Run
from vstain_cli.infer.wholeslide import RegionStats
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.slides import TiffSlide
from vstain_cli.io.tiff import read_provenance, write_pyramid
from vstain_cli.progress import NullProgress
from vstain_cli.train.loop import train
from vstain_cli.uq.intervals import Calibration
from vstain_cli.uq.maps import (
    FILES,
    RegionMaps,
    ScaleChoice,
    UncertaintyOptions,
    apply_heatmap,
    heatmap_lut,
    nice_ceiling,
    uncertainty_slide,
)

torch.set_num_threads(1)

SIGMA = 0.2  # oracle's per-pixel standard deviation in [-1, 1] units


class GaussianOracle(nn.Module):
    """eps-prediction of the exact denoiser of x0 ~ N(mu(cond), SIGMA^2), independent pixels.

    E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu) (Gaussian
    posterior, x_t = sqrt(a) x0 + sqrt(1 - a) eps, Ho et al. 2020 eq. 4).
    """

    def __init__(self, alphas_cumprod: np.ndarray, sigma: float = SIGMA) -> None:
        super().__init__()
        self.register_buffer("ac", torch.as_tensor(alphas_cumprod, dtype=torch.float32))
        self.s2 = sigma * sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.ac[t.long()].view(-1, 1, 1, 1)
        mu = 0.5 * cond[:, :3]
        x0 = mu + a.sqrt() * self.s2 / (a * self.s2 + 1 - a) * (x - a.sqrt() * mu)
        return (x - a.sqrt() * x0) / (1 - a).clamp_min(1e-8).sqrt()


def oracle_run(path: Path, channels: int = 4, tile: int = 32, sigma: float = SIGMA, timesteps: int = 1000) -> Run:
    """A diffusion Run around ``GaussianOracle`` (AF normalised with 900..5000 like the tiny dataset;
    cosine schedule of ``timesteps`` steps)."""
    preset = micro("tiny-diffusion", model={"attention_levels": []}, diffusion={"timesteps": timesteps})
    schedule = preset.diffusion.build_schedule()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return Run(path=path, config={}, preset=preset, kind="diffusion", channels=channels, tile_size=tile, step=0,
               device=torch.device("cpu"), model=GaussianOracle(schedule.alphas_cumprod, sigma),
               schedule=schedule, prediction="eps", af_low=np.full(channels, 900, np.float32),
               af_high=np.full(channels, 5000, np.float32))


def write_af(path: Path, h: int = 384, w: int = 512, channels: int = 4, tissue: bool = True) -> Path:
    """A uint16 AF slide: bright elliptic tissue with a left-right ramp on dim glass."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1).astype(np.float32)
    if not tissue:
        blob[:] = 0
    ramp = (xx / w)[None] * np.linspace(0.5, 1.5, channels)[:, None, None]
    sig = 100 + blob[None] * (2300 + 2500 * ramp) + rng.normal(0, 20, (channels, h, w))
    af = np.clip(sig, 0, 65535).astype(np.uint16).transpose(1, 2, 0)
    write_pyramid(path, [af], h, w, channels, np.uint16, mpp=0.5, compression="zlib", min_level_size=256)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc")
    ds = make_tiny_dataset(root / "ds")
    train(micro("tiny-diffusion", model={"attention_levels": []}, train={"steps": 2}), ds, root / "diff", device="cpu")
    train(micro("tiny-regression", model={"attention_levels": []}, train={"steps": 1}), ds, root / "reg", device="cpu")
    return {
        "root": root, "diff": root / "diff", "reg": root / "reg", "af": write_af(root / "af.tif"),
        "af5": write_af(root / "af5.tif", channels=5), "glass": write_af(root / "glass.tif", tissue=False),
    }


OPTS = dict(samples=6, steps=5, region=256, batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def oracle_maps(env):
    run = oracle_run(env["root"] / "oracle")
    p = NullProgress()
    res = uncertainty_slide(env["af"], run, env["root"] / "unc", UncertaintyOptions(**OPTS), progress=p)
    return run, res, p


def _read(res, key):
    return tifffile.imread(res.files[key])


def test_maps_open_in_openslide_with_levels_and_mpp(oracle_maps):
    _, res, p = oracle_maps
    assert sorted(f.name for f in res.out.iterdir()) == sorted(FILES.values())
    assert res.levels == [(384, 512), (192, 256)] and res.lam == 1.0 and res.calibration is None
    assert any("no calibration" in w and "lambda = 1" in w for w in p.warnings)
    for key in ("lower", "upper", "mean", "width"):
        s = openslide.OpenSlide(res.files[key])
        assert s.level_count == 2 and s.level_dimensions == ((512, 384), (256, 192)), key
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        s.close()
    assert not list(res.out.parent.glob(".unc.partial-*"))  # the temp folder was renamed


def test_interval_order_and_float_width(oracle_maps):
    _, res, _ = oracle_maps
    lo, hi, mean = (_read(res, k).astype(np.int16) for k in ("lower", "upper", "mean"))
    assert lo.shape == hi.shape == mean.shape == (384, 512, 3)
    # N <= 20 and lambda >= 1: q05 <= mean <= q95 per pixel (mean >= 0.05 s_(1) + 0.95 s_(2));
    # linear blending and rounding keep the order.
    assert (lo <= mean).all() and (mean <= hi).all()
    w = _read(res, "width_float")
    assert w.dtype == np.float32 and w.shape == (384, 512)
    np.testing.assert_allclose(w, (hi - lo).mean(axis=-1), atol=1.0)  # uint8 rounding of both bounds
    assert (w >= 0).all() and w.max() > 5


def test_maps_match_the_oracle(oracle_maps, env):
    """Mean map = oracle mean on tissue; spread is non-degenerate and zero on glass."""
    _, res, _ = oracle_maps
    with tifffile.TiffFile(env["af"]) as t:
        af = t.asarray().transpose(2, 0, 1)
    mu = (0.5 * normalize_af(af, np.full(4, 900.0), np.full(4, 5000.0))[:3] + 1) * 127.5
    mean = _read(res, "mean").astype(np.float32).transpose(2, 0, 1)
    w = _read(res, "width_float")
    tissue = np.zeros((384, 512), bool)
    tissue[150:234, 200:312] = True  # well inside the ellipse
    assert np.abs(mean - mu)[:, tissue].mean() < 6.0  # 6 samples of sd ~ 11: sd of the mean ~ 4.5
    assert 10 < np.median(w[tissue]) < 60
    assert w[:8, :8].max() == 0 and (_read(res, "mean")[:8, :8] == 255).all()  # glass: white, no spread
    s = res.summary
    # (the fade ring around the section keeps the oracle's dark glass prediction as its lower bound,
    # so the mean over the whole slide is not below the tissue's)
    assert s["mean_width_tissue"] > 10 and s["mean_width_all"] > 0 and 0.2 < s["tissue_fraction"] < 0.6


def test_heatmap_scale_and_provenance(oracle_maps):
    run, res, _ = oracle_maps
    meta = json.loads(res.files["json"].read_text())
    assert meta["format"] == "vstain-uncertainty" and meta["lam"] == 1.0 and meta["calibration"] is None
    assert meta["samples"] == 6 and meta["sampler"] == "ddim" and meta["steps"] == 5 and meta["seed"] == 0
    assert meta["inputs"]["af"]["name"] == "af.tif" and meta["software"]["vstain"]
    assert meta["config"]["model"] == str(run.path)
    assert meta["summary"]["mean_width_tissue"] == pytest.approx(res.summary["mean_width_tissue"])
    vmax = meta["heatmap"]["vmax"]
    assert vmax == res.heatmap_max == nice_ceiling(res.summary["p99_width_tissue"])
    prov = read_provenance(res.files["width"])
    assert prov["heatmap"]["vmax"] == vmax and prov["heatmap"]["colormap"] == "viridis"
    heat = _read(res, "width")
    expect = apply_heatmap(_read(res, "width_float"), vmax, heatmap_lut())
    assert np.abs(heat.astype(int) - expect).max() <= 1
    from PIL import Image

    png = Image.open(res.files["overlay"])
    assert png.mode == "RGB" and png.size[0] >= 512


def test_deterministic_and_seeded(oracle_maps, env, tmp_path):
    run, res, _ = oracle_maps
    again = uncertainty_slide(env["af"], run, tmp_path / "a", UncertaintyOptions(**OPTS))
    assert np.array_equal(_read(res, "width_float"), _read(again, "width_float"))
    other = uncertainty_slide(env["af"], run, tmp_path / "b", UncertaintyOptions(**{**OPTS, "seed": 1}))
    assert not np.array_equal(_read(res, "width_float"), _read(other, "width_float"))


def test_calibration_scales_and_force(oracle_maps, env, tmp_path):
    run, res, _ = oracle_maps
    cal = tmp_path / "cal.json"
    Calibration(lam=2.0, alpha=0.1, delta=0.1, risk=0.05, ucb=0.08, n=100, samples=6, interval="centered").to_json(cal)
    doc = json.loads(cal.read_text())
    cal.write_text(json.dumps({**doc, "sampler": "ddpm", "steps_effective": 5, "eta": 0.0}))
    out = tmp_path / "unc"
    out.mkdir()
    opts = {k: v for k, v in OPTS.items() if k != "samples"}  # samples: the calibration's (6)
    with pytest.raises(OutputExistsError):
        uncertainty_slide(env["af"], run, out, UncertaintyOptions(**opts), calibration=cal)
    # made with another sampler (DDPM: eta 1 too): refused, in one line naming the differences
    with pytest.raises(InputError, match=r"other settings \(sampler ddpm -> ddim, eta 1.0 -> 0.0\)"):
        uncertainty_slide(env["af"], run, out, UncertaintyOptions(**opts), calibration=cal, force=True)
    cal.write_text(json.dumps({**doc, "sampler": "ddim", "steps_effective": 5, "eta": 0.0}))
    with pytest.raises(InputError, match=r"samples 6 -> 8"):
        uncertainty_slide(env["af"], run, out, UncertaintyOptions(**{**opts, "samples": 8}), calibration=cal,
                          force=True)
    p = NullProgress()
    r2 = uncertainty_slide(env["af"], run, out, UncertaintyOptions(**opts), calibration=cal, force=True, progress=p)
    assert r2.lam == 2.0 and r2.calibration == cal and r2.samples == 6 and r2.interval == "centered"
    assert not any("calibration" in w for w in p.warnings)
    ratio = np.median(_read(r2, "width_float")[150:234, 200:312]) / np.median(_read(res, "width_float")[150:234, 200:312])
    assert ratio == pytest.approx(2.0, rel=0.05)  # same samples, interval scaled around the median
    assert json.loads(r2.files["json"].read_text())["lam"] == 2.0
    # a calibration.json in the run folder is picked up without --calibration
    shutil.copy(cal, run.path / "calibration.json")
    try:
        r3 = uncertainty_slide(env["af"], run, out, UncertaintyOptions(**OPTS), force=True)
        assert r3.lam == 2.0 and r3.calibration == run.path / "calibration.json"
    finally:
        (run.path / "calibration.json").unlink()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds no uncertainty.json"):
        uncertainty_slide(env["af"], run, tmp_path / "precious", UncertaintyOptions(**OPTS), force=True)


def test_multiplicative_calibration_on_0_255(oracle_maps, env, tmp_path):
    """A multiplicative calibration gives [l / lam, u * lam] on [0, 1], i.e. l / lam and min(255, u lam) in 0-255."""
    run, res, _ = oracle_maps
    cal = tmp_path / "cal.json"
    Calibration(lam=1.25, alpha=0.1, delta=0.1, risk=0.05, ucb=0.08, n=100, samples=6).to_json(cal)
    r = uncertainty_slide(env["af"], run, tmp_path / "m", UncertaintyOptions(**OPTS), calibration=cal)
    meta = json.loads(r.files["json"].read_text())
    assert meta["interval"] == "multiplicative" and meta["lam"] == 1.25 and meta["eta"] == 0.0
    inner = (slice(150, 234), slice(200, 312))  # tissue weight 1: no fade
    lo0, hi0 = _read(res, "lower")[inner].astype(float), _read(res, "upper")[inner].astype(float)
    lo1, hi1 = _read(r, "lower")[inner].astype(float), _read(r, "upper")[inner].astype(float)
    np.testing.assert_allclose(lo1, lo0 / 1.25, atol=1.0)  # uint8 rounding of both
    np.testing.assert_allclose(hi1, np.minimum(255, hi0 * 1.25), atol=1.5)


class _FakeMask:
    def __init__(self, weight: float) -> None:
        self.weight = weight

    def box(self, y0, y1, x0, x1):
        return np.ones((y1 - y0, x1 - x0), bool)

    def soft_box(self, y0, y1, x0, x1):
        return np.full((y1 - y0, x1 - x0), self.weight, np.float32)


class _FakeSampler:
    """Sample k of every region is the constant 100 + 10 k (unblended, as RegionMaps asks)."""

    def __init__(self, weight: float) -> None:
        self.mask, self.stats, self.blend_glass = _FakeMask(weight), RegionStats(), True

    def __call__(self, region, sample_index=0):
        y0, y1, x0, x1 = region.outer
        return np.full((y1 - y0, x1 - x0, 3), 100.0 + 10 * sample_index, np.float32)


def test_quantiles_of_unblended_samples_then_the_fade():
    """At tissue weight s > 0 the interval is [l, s u + (1 - s) 255]: blending the samples first would give
    [s l + (1 - s) 255, s u + (1 - s) 255], s times narrower. Glass (s = 0) is white."""
    from types import SimpleNamespace

    samples = 100.0 + 10 * np.arange(6)
    l, u, mean = np.quantile(samples, 0.05), np.quantile(samples, 0.95), samples.mean()
    region = SimpleNamespace(outer=(0, 4, 0, 5), index=0)
    for s in (1.0, 0.5, 0.2):
        fake = _FakeSampler(s)
        maps = RegionMaps(fake, 6, ScaleChoice(), NullProgress())(region)
        assert fake.blend_glass is False  # RegionMaps asks for the model's own pixels
        np.testing.assert_allclose(maps[..., 0:3], l, rtol=1e-6)
        np.testing.assert_allclose(maps[..., 3:6], s * u + (1 - s) * 255, rtol=1e-6)
        np.testing.assert_allclose(maps[..., 6:9], s * mean + (1 - s) * 255, rtol=1e-6)
        width = maps[0, 0, 9]
        assert width >= u - l - 1e-4 and (s == 1 or width > s * (u - l) + 1.0)
    maps = RegionMaps(_FakeSampler(0.0), 6, ScaleChoice(), NullProgress())(region)
    assert (maps[..., :9] == 255).all() and (maps[..., 9] == 0).all()  # glass (s = 0): white, as stain writes it


def _write_he(path: Path, rgb: np.ndarray) -> Path:
    h, w = rgb.shape[:2]
    write_pyramid(path, [rgb], h, w, 3, np.uint8, mpp=0.5, compression="zlib", min_level_size=256)
    return path


def test_reference_coverage(oracle_maps, env, tmp_path):
    """--reference: coverage of the real H&E on tissue, checked against the written maps."""
    run, res, _ = oracle_maps
    with TiffSlide(env["af"]) as slide:
        tissue = SlideMask(slide, 32).box(0, 384, 0, 512)
    lo, hi = _read(res, "lower"), _read(res, "upper")
    # the written mean lies in [lower, upper] everywhere: coverage 1
    ref = _write_he(tmp_path / "mean.tif", _read(res, "mean"))
    r = uncertainty_slide(env["af"], run, tmp_path / "a", UncertaintyOptions(**OPTS), reference=ref)
    assert r.reference["coverage"] == 1.0 and r.reference["values"] == 3 * int(tissue.sum())
    assert r.reference["nominal_coverage"] is None  # uncalibrated
    width = (hi.astype(float) - lo)[tissue].mean(axis=-1).mean()
    assert r.reference["mean_width_tissue"] == pytest.approx(width)
    # white glass everywhere: inside exactly where the upper bound is 255
    white = _write_he(tmp_path / "white.tif", np.full((384, 512, 3), 255, np.uint8))
    r = uncertainty_slide(env["af"], run, tmp_path / "b", UncertaintyOptions(**OPTS), reference=white)
    assert r.reference["coverage"] == pytest.approx(float((hi[tissue] == 255).mean()))
    assert r.reference["coverage"] < 0.5
    meta = json.loads(r.files["json"].read_text())
    assert meta["reference_check"]["coverage"] == r.reference["coverage"]
    assert meta["inputs"]["reference"]["name"] == "white.tif"
    small = _write_he(tmp_path / "small.tif", np.full((256, 512, 3), 255, np.uint8))
    with pytest.raises(InputError, match="--reference is 512x256 px, 3 channels, the AF slide is 512x384"):
        uncertainty_slide(env["af"], run, tmp_path / "c", UncertaintyOptions(**OPTS), reference=small)
    assert not (tmp_path / "c").exists()


def test_cli_subprocess(env, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 threads on a busy 2-core machine run ~10x slower
    out = tmp_path / "unc"
    white = _write_he(tmp_path / "white.tif", np.full((384, 512, 3), 255, np.uint8))
    proc = run_cli("uncertainty", str(env["af"]), "--model", str(env["diff"]), "--samples", "2", "--steps", "1",
                   "--out", str(out), "--device", "cpu", "--batch-size", "64", "--region", "512",
                   "--reference", str(white))
    assert proc.returncode == 0, proc.stderr
    assert "lambda = 1" in proc.stderr and "no calibration" in proc.stderr and "wrote" in proc.stderr
    assert "DDIM-1, eta 0" in proc.stderr and "reference H&E coverage on tissue" in proc.stderr
    assert sorted(f.name for f in out.iterdir()) == sorted(FILES.values())
    assert openslide.OpenSlide(out / "mean.tif").level_count == 2


def test_cli_bad_inputs(env, tmp_path):
    runner = CliRunner()
    base = ["--device", "cpu", "--steps", "1", "--samples", "2"]

    def unc(af, model, out, *extra):
        return runner.invoke(app, ["uncertainty", str(af), "--model", str(model), "--out", str(out), *base, *extra])

    assert_one_error_result(unc(env["af5"], env["diff"], tmp_path / "o"), "AF has 5 channels but model")
    assert_one_error_result(unc(env["af"], env["reg"], tmp_path / "o"), "deterministic")
    nowts = tmp_path / "nowts"
    shutil.copytree(env["diff"], nowts)
    (nowts / "weights.safetensors").unlink()
    assert_one_error_result(unc(env["af"], nowts, tmp_path / "o"), "weights.safetensors")
    (nowts / "weights.safetensors").write_bytes(b"garbage, not safetensors")
    assert_one_error_result(unc(env["af"], nowts, tmp_path / "o"), "weights.safetensors")
    assert_one_error_result(unc(env["glass"], env["diff"], tmp_path / "o"), "no tissue")
    (tmp_path / "exists").mkdir()
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "exists"), "--force")
    assert_one_error_result(unc(env["af"], env["diff"], env["af"]), "output path is the input")
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--samples", "1"), "--samples must be at least 2")
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--sampler", "euler"), "unknown sampler")
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--protocol", "paper"),
                            "--protocol paper runs the model's T steps; drop --steps 1")
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--reference", str(tmp_path / "no.tif")),
                            "no.tif")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--calibration", str(bad)), "corrupt calibration")
    bad.write_text(json.dumps({"format": "vstain-calibration", "lam": "x"}))
    assert_one_error_result(unc(env["af"], env["diff"], tmp_path / "o", "--calibration", str(bad)), "corrupt calibration")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
