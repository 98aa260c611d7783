"""Whole-slide uncertainty maps: N stitched samples -> calibrated credible intervals.

``vstain uncertainty`` (docs/uncertainty.md §6-7, docs/architecture.md). Following
Sridhar et al. 2023 (§ uncertainty): draw N diffusion samples per input, take the
per-pixel 5th and 95th percentiles, and scale the interval around the sample
median by lambda, calibrated on the validation split with RCPS (Bates et al.
2021; Angelopoulos et al. 2022, im2im-uq; ``vstain calibrate``).

Streaming, exactly like ``stain``: the slide is cut into the same regions; in a
region, sample k is the region ``stain`` would write with sample index k (joint
MultiDiffusion denoising on the counter-based noise canvas of seed
``seed + 1_000_003 k``), so sample 0 is the ``stain`` output of the same seed.
Only the N samples of one region are held (N x region x 3 float32); the maps of
each region (lower, upper, mean RGB and the width, 10 channels) are feather-
blended with one ``RegionBlender`` and fanned out to the pyramid writers.

Outputs (a folder written under a temporary name and renamed when complete):
``lower.tif``, ``upper.tif``, ``mean.tif`` (RGB uint8 pyramids, lossless so
lower <= upper per pixel survives), ``width.tif`` (uint8 viridis heat map
pyramid, scale in its metadata), ``width.float32.tif`` (float32 width, mean over
RGB in 0-255 units, for analysis with tifffile), ``width.png`` (heat map over the
mean-stain thumbnail) and ``uncertainty.json`` (provenance and summary).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstain_cli.diffusion.samplers import resolve_steps
from vstain_cli.errors import InputError, OutputExistsError, input_errors
from vstain_cli.infer import stitch
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.infer.wholeslide import (
    RegionSampler,
    RegionStats,
    SlideOptions,
    make_plan,
    open_for_inference,
    region_stream,
    require_diffusion,
)
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.slides import TiffSlide
from vstain_cli.io.tiff import write_pyramid, write_pyramids
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, ensure_writable_dir, fingerprint, record, write_json
from vstain_cli.seeding import SAMPLE_STRIDE
from vstain_cli.train.run_folder import CALIBRATION_FILE
from vstain_cli.uq.intervals import Calibration, sample_quantiles, scaled_interval

FILES = {
    "lower": "lower.tif", "upper": "upper.tif", "mean": "mean.tif", "width": "width.tif",
    "width_float": "width.float32.tif", "overlay": "width.png", "json": "uncertainty.json",
}
CHANNELS = 10                  # lower RGB | upper RGB | mean RGB | width
STRIP_ROWS = 256
MIN_LEVEL_SIZE = 256
QUANTILE_ROWS = 64             # rows per sort when taking quantiles (bounds the sort's copy)
HIST_BINS_PER_UNIT = 4         # width histogram resolution (0.25 of a 0-255 unit)
LUT_SIZE = 1024
OVERLAY_ALPHA = 0.65


@dataclass
class UncertaintyOptions(SlideOptions):
    """How uncertainty maps are made; recorded in uncertainty.json."""

    samples: int = 20
    width_max: float | None = None  # heat-map scale top (0-255 units); None: 99th percentile over tissue
    compression: str = "zlib"       # lossless: JPEG would break lower <= mean <= upper per pixel

    def check(self) -> None:
        super().check()
        if self.samples < 2:
            raise ValueError(f"--samples must be at least 2 (quantiles need a spread), got {self.samples}")
        if self.compression == "jpeg":
            raise ValueError("uncertainty maps are written losslessly (zlib, zstd, lzw or none), not jpeg")
        if self.width_max is not None and not 0 < self.width_max <= 255:
            raise ValueError(f"--width-max must be in (0, 255], got {self.width_max}")


# ----------------------------------------------------------------------------- calibration


@dataclass
class ScaleChoice:
    """The interval scale used for the maps and where it came from."""

    lam: float = 1.0
    q_low: float = 0.05
    q_high: float = 0.95
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_calibration(run: Run, calibration: str | Path | None) -> ScaleChoice:
    """The given calibration file, else ``RUN/calibration.json`` if present, else lambda = 1."""
    path = Path(calibration) if calibration is not None else run.path / CALIBRATION_FILE
    if calibration is None and not path.exists():
        return ScaleChoice()
    cal = Calibration.from_json(path)  # InputError naming the file when missing or corrupt
    meta = json.loads(path.read_text())
    return ScaleChoice(cal.lam, cal.q_low, cal.q_high, path, meta)


def calibration_warnings(scale: ScaleChoice, run: Run, options: UncertaintyOptions, steps: int) -> list[str]:
    """Why the interval may not hold: no calibration, or maps made unlike the calibration."""
    if scale.path is None:
        return [(f"no calibration ({run.path / CALIBRATION_FILE} not found): lambda = 1, the raw 5-95 % sample "
                 "interval, whose coverage is not guaranteed; run `vstain calibrate` first")]
    m = scale.meta
    now = {"sampler": options.sampler, "steps_effective": steps, "samples": options.samples, "model_step": run.step}
    diff = [f"{k.replace('_effective', '')} {m[k]} -> {v}" for k, v in now.items()
            if m.get(k) is not None and m[k] != v]
    if not diff:
        return []
    return [(f"calibration {scale.path} was made differently ({', '.join(diff)}): its lambda may not hold; "
             "recalibrate with the same settings")]


# ----------------------------------------------------------------------------- per region


class _CachingSampler(RegionSampler):
    """A RegionSampler that reads and conditions a region's AF once for all N samples."""

    _cached: tuple[int, torch.Tensor] | None = None

    def condition(self, region: stitch.Region) -> torch.Tensor:
        if self._cached is None or self._cached[0] != region.index:
            self._cached = (region.index, super().condition(region))
        return self._cached[1]


class RegionMaps:
    """One region -> (outer h, outer w, 10) float32: lower, upper, mean RGB and width (0-255).

    Sample k of the region is ``RegionSampler(region, sample_index=k)``; the per-pixel
    quantiles (Sridhar et al. 2023: 5th/95th of 20 samples) are scaled by lambda
    around the median (Conffusion / RCPS, ``uncertainty.scaled_interval``) and
    clipped to the pixel range [0, 255], which no target leaves, so the clip never
    changes coverage. Width = mean over RGB of upper - lower.
    """

    def __init__(self, sampler: RegionSampler, samples: int, scale: ScaleChoice, progress: Progress) -> None:
        self.sampler, self.n, self.scale, self.progress = sampler, samples, scale, progress

    def __call__(self, region: stitch.Region) -> np.ndarray:
        y0, y1, x0, x1 = region.outer
        h, w = y1 - y0, x1 - x0
        out = np.empty((h, w, CHANNELS), np.float32)
        if not self.sampler.mask.box(y0, y1, x0, x1).any():  # glass: every sample is white
            out[..., :9] = 255.0
            out[..., 9] = 0.0
            self.sampler.stats.regions += 1
            self.sampler.stats.regions_background += 1
            return out
        stack = np.empty((self.n, h, w, 3), np.float32)
        self.progress.start("samples", f"region {region.index + 1}: samples", self.n)
        for k in range(self.n):
            stack[k] = self.sampler(region, sample_index=k)
            self.progress.advance("samples")
        self.progress.finish("samples")
        s = self.scale
        for r in range(0, h, QUANTILE_ROWS):
            lo, hi, med, mean = sample_quantiles(stack[:, r:r + QUANTILE_ROWS], s.q_low, s.q_high)
            lo, hi = scaled_interval(lo, hi, med, s.lam)
            lo, hi = np.clip(lo, 0.0, 255.0), np.clip(hi, 0.0, 255.0)
            rows = out[r:r + QUANTILE_ROWS]
            rows[..., 0:3], rows[..., 3:6], rows[..., 6:9] = lo, hi, mean
            rows[..., 9] = (hi - lo).mean(axis=-1)
        return out


# ----------------------------------------------------------------------------- strips and stats


class WidthStats:
    """Running statistics of the width map over tissue (histogram of 0.25-unit bins)."""

    def __init__(self) -> None:
        self.hist = np.zeros(256 * HIST_BINS_PER_UNIT + 1, np.int64)
        self.sum_tissue = 0.0
        self.sum_all = 0.0
        self.pixels = 0

    def add(self, width: np.ndarray, tissue: np.ndarray) -> None:
        self.sum_all += float(width.sum(dtype=np.float64))
        self.pixels += width.size
        v = width[tissue]
        self.sum_tissue += float(v.sum(dtype=np.float64))
        idx = np.minimum((v * HIST_BINS_PER_UNIT).astype(np.int64), self.hist.size - 1)
        self.hist += np.bincount(idx, minlength=self.hist.size)

    def percentile(self, q: float) -> float:
        """Upper edge of the histogram bin holding the q-th percentile of tissue widths."""
        total = int(self.hist.sum())
        if total == 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.hist), q / 100.0 * total))
        return min(255.0, (i + 1) / HIST_BINS_PER_UNIT)

    def summary(self) -> dict[str, float]:
        tissue = int(self.hist.sum())
        return {
            "mean_width_tissue": self.sum_tissue / tissue if tissue else 0.0,
            "median_width_tissue": self.percentile(50),
            "p95_width_tissue": self.percentile(95),
            "p99_width_tissue": self.percentile(99),
            "mean_width_all": self.sum_all / self.pixels if self.pixels else 0.0,
            "tissue_pixels": tissue,
            "tissue_fraction": tissue / self.pixels if self.pixels else 0.0,
            "unit": "0-255 RGB units, mean over channels of upper - lower",
        }


def _as_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _blended(plan: list[stitch.Region], regions: Iterator[tuple[stitch.Region, np.ndarray]], height: int,
             width: int) -> Iterator[np.ndarray]:
    """``stain.blended_strips`` for the 10 map channels, dropping each buffer as soon as it is used.

    Rows are emitted as soon as they are final (no tile alignment; the writers re-chunk
    uint8), so the float32 buffer holds about one region row x slide width x 10 channels.
    """
    blender = stitch.RegionBlender(height, width, CHANNELS, plan, None)
    for region, pixels in regions:
        done = blender.add(region, pixels)
        del pixels
        while done:
            yield done.pop(0)[1]
    done = blender.close()
    while done:
        yield done.pop(0)[1]


def map_strips(strips: Iterator[np.ndarray], mask: SlideMask, stats: WidthStats
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Blended 10-channel strips -> (lower, upper, mean uint8 RGB, width float32), with stats."""
    y = 0
    for strip in strips:
        for r in range(0, strip.shape[0], STRIP_ROWS):  # small pieces: small conversion and queue copies
            s = strip[r:r + STRIP_ROWS]
            h, w = s.shape[:2]
            width = np.ascontiguousarray(s[..., 9])
            stats.add(width, mask.box(y, y + h, 0, w))
            y += h
            yield _as_u8(s[..., 0:3]), _as_u8(s[..., 3:6]), _as_u8(s[..., 6:9]), width[..., None]
        strip = s = None  # drop the float32 rows before the blender fills the next region row


def heatmap_lut(size: int = LUT_SIZE) -> np.ndarray:
    """(size, 3) uint8 viridis lookup table (the colours of ``viz.colormap``)."""
    from vstain_cli.io.images import colormap

    return colormap(np.linspace(0.0, 1.0, size)[None], 0.0, 1.0)[:, 0, :].T.copy()


def apply_heatmap(width: np.ndarray, vmax: float, lut: np.ndarray) -> np.ndarray:
    """Width (..., ) 0-255 units -> uint8 RGB (..., 3): colour position = width / vmax (clipped)."""
    idx = np.clip(width * ((len(lut) - 1) / vmax), 0, len(lut) - 1)
    return lut[np.rint(idx).astype(np.int32)]


def _heatmap_strips(width_path: Path, height: int, width: int, vmax: float) -> Iterator[np.ndarray]:
    """Stream width.float32.tif back as heat-map strips (second pass; memory: one strip)."""
    lut = heatmap_lut()
    with TiffSlide(width_path) as t:
        for y in range(0, height, STRIP_ROWS):
            h = min(STRIP_ROWS, height - y)
            yield apply_heatmap(t.read_region(0, y, width, h)[..., 0], vmax, lut)


def nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v (a readable heat-map top), at most 255."""
    if v <= 0:
        return 1.0
    k = np.floor(np.log10(v))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * 10 ** k >= v - 1e-9:
            return float(min(255.0, m * 10 ** k))
    return 255.0


def write_overlay_png(mean_path: Path, width_path: Path, mask: SlideMask, png_path: Path, vmax: float,
                      max_size: int = 1024) -> Path:
    """Width heat map alpha-blended over the mean-stain thumbnail (tissue only), with a colour bar."""
    from PIL import Image, ImageDraw

    with TiffSlide(mean_path) as t:
        base, _ = t.thumbnail(max_size)
    with TiffSlide(width_path) as t:
        wthumb, _ = t.thumbnail(max_size)
    h, w = base.shape[:2]
    ys = np.minimum((np.arange(h) * mask.mask.shape[0] / h).astype(int), mask.mask.shape[0] - 1)
    xs = np.minimum((np.arange(w) * mask.mask.shape[1] / w).astype(int), mask.mask.shape[1] - 1)
    alpha = np.float32(OVERLAY_ALPHA) * mask.mask[ys[:, None], xs[None, :]][..., None].astype(np.float32)
    img = base[..., :3].astype(np.float32)
    img += alpha * (apply_heatmap(wthumb[..., 0], vmax, heatmap_lut()) - img)  # alpha blend, in place
    bar_h, pad = 14, 16
    canvas = np.full((h + bar_h + 2 * pad, max(w, 160), 3), 255, np.uint8)
    canvas[:h, :w] = _as_u8(img)
    bar_w = canvas.shape[1] - 2 * pad
    canvas[h + 4:h + 4 + bar_h, pad:pad + bar_w] = apply_heatmap(
        np.linspace(0, vmax, bar_w)[None].repeat(bar_h, 0), vmax, heatmap_lut())
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    draw.text((pad, h + bar_h + 6), "0", fill=(0, 0, 0))
    label = f"{vmax:g} (interval width, 0-255 units)"
    draw.text((max(pad, pad + bar_w - 6 * len(label)), h + bar_h + 6), label, fill=(0, 0, 0))
    with atomic_output(png_path) as tmp:
        im.save(tmp, format="PNG")
    return png_path


# ----------------------------------------------------------------------------- output folder


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def check_output_folder(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that is an input, holds an input, or exists without ``force``.

    With ``force`` only an earlier uncertainty output (or an empty folder) is replaced.
    """
    for src in inputs:
        if out.resolve() == src.resolve():
            raise InputError("output path is the input; choose another --out folder", out)
        if out.exists() and _inside(src, out):
            raise InputError(f"--out folder holds the input {src}; choose another folder", out)
    if out.exists():
        if not force:
            raise OutputExistsError("output exists; pass --force to overwrite it", out)
        if not out.is_dir():
            raise InputError("output exists and is not a folder (uncertainty writes a folder)", out)
        if any(out.iterdir()) and not (out / FILES["json"]).exists():
            raise InputError("output folder is not an uncertainty output (no uncertainty.json); "
                             "refusing to replace it", out)
    ensure_writable_dir(out.parent)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out`` (replacing an old output)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- entry point


@dataclass
class UncertaintyResult:
    """What ``uncertainty_slide`` wrote and measured."""

    out: Path
    files: dict[str, Path]
    lam: float
    calibration: Path | None
    levels: list[tuple[int, int]]
    summary: dict[str, Any]
    heatmap_max: float
    seconds: float
    stats: RegionStats


def uncertainty_slide(
    af_path: str | Path,
    model: str | Path | Run,
    out: str | Path,
    options: UncertaintyOptions | None = None,
    *,
    calibration: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> UncertaintyResult | None:
    """Per-pixel credible-interval maps of a whole AF slide (None on torchrun ranks > 0)."""
    options = options or UncertaintyOptions()
    with input_errors():
        options.check()
    progress = progress or NullProgress()
    af_path, out = Path(af_path), Path(out)
    rank = int(os.environ.get("RANK", "0"))  # torchrun: every rank samples, rank 0 writes
    t0 = time.perf_counter()
    run = resolve_run(model, options.device)
    require_diffusion(run)
    inputs = [af_path, run.path] + ([Path(calibration)] if calibration is not None else [])
    if rank == 0:
        check_output_folder(out, force, inputs)
    scale = resolve_calibration(run, calibration)
    steps = resolve_steps(options.sampler, options.steps, run.schedule.T)
    run, slide = open_for_inference(af_path, run, options.device)
    try:
        mask = SlideMask(slide, run.tile_size)
        if mask.empty:
            raise InputError("no tissue found in the AF slide (nothing to measure)", af_path)
        for message in calibration_warnings(scale, run, options, steps) if rank == 0 else []:
            progress.warn(message)
        plan = make_plan(slide, run, options)
        sampler = _CachingSampler(run, slide, mask, options)
        regions = region_stream(plan, RegionMaps(sampler, options.samples, scale, progress), out, progress)
        if rank != 0:
            for _ in regions:
                pass
            return None
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            result = _write_outputs(tmp, af_path, run, slide, mask, plan, regions, options, scale, steps,
                                    sampler, progress)
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        slide.close()
    files = {k: out / v for k, v in FILES.items()}
    levels, summary, vmax = result
    return UncertaintyResult(out, files, scale.lam, scale.path, levels, summary, vmax,
                             time.perf_counter() - t0, sampler.stats)


def _write_outputs(tmp: Path, af_path: Path, run: Run, slide: TiffSlide, mask: SlideMask, plan, regions,
                   options: UncertaintyOptions, scale: ScaleChoice, steps: int, sampler: RegionSampler,
                   progress: Progress) -> tuple[list[tuple[int, int]], dict[str, Any], float]:
    """Both passes into the temp folder: maps + float width, then heat map, PNG and JSON."""
    H, W = slide.height, slide.width
    config = {
        "uncertainty": asdict(options), "steps_effective": steps, "model": str(run.path), "model_kind": run.kind,
        "model_step": run.step, "window_overlap": sampler.overlap, "lam": scale.lam, "q_low": scale.q_low,
        "q_high": scale.q_high, "calibration": None if scale.path is None else str(scale.path),
        "sample_seeds": f"noise seed {options.seed} + {SAMPLE_STRIDE} k for sample k",
    }
    inputs = {"af": fingerprint(af_path)}
    if (run.path / "config.json").exists():
        inputs["model_config"] = fingerprint(run.path / "config.json")
    if scale.path is not None:
        inputs["calibration"] = fingerprint(scale.path)
    meta = record(config, inputs)
    common = dict(height=H, width=W, mpp=slide.mpp, compression=options.compression,
                  min_level_size=MIN_LEVEL_SIZE)
    specs = [
        dict(path=tmp / FILES["lower"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"lower bound, quantile {scale.q_low} scaled by lambda {scale.lam}"}, **common),
        dict(path=tmp / FILES["upper"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"upper bound, quantile {scale.q_high} scaled by lambda {scale.lam}"}, **common),
        dict(path=tmp / FILES["mean"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"mean of {options.samples} samples"}, **common),
        dict(path=tmp / FILES["width_float"], samples=1, dtype=np.float32,
             metadata={**meta, "map": "interval width upper - lower, mean over RGB, 0-255 units"}, **common),
    ]
    stats = WidthStats()
    strips = _blended(plan, regions, H, W)
    write_pyramids(specs, map_strips(strips, mask, stats), queue_size=1)
    summary = stats.summary()
    vmax = float(options.width_max) if options.width_max else nice_ceiling(summary["p99_width_tissue"])
    scale_meta = {"colormap": "viridis", "vmin": 0.0, "vmax": vmax, "unit": "0-255 RGB units",
                  "value_to_width": f"colour position p in [0, 1] (viridis, dark -> yellow) = width / {vmax:g}, "
                                    "clipped at 1"}
    progress.start("heatmap", "width heat map", None)
    levels = write_pyramid(tmp / FILES["width"], _heatmap_strips(tmp / FILES["width_float"], H, W, vmax), H, W, 3,
                           np.uint8, metadata={**meta, "map": "interval width heat map", "heatmap": scale_meta},
                           **{k: v for k, v in common.items() if k not in ("height", "width")})
    write_overlay_png(tmp / FILES["mean"], tmp / FILES["width_float"], mask, tmp / FILES["overlay"], vmax)
    progress.finish("heatmap")
    write_json(tmp / FILES["json"], {
        "format": "vstain-uncertainty", "format_version": 1, **meta,
        "lam": scale.lam, "calibration": config["calibration"], "samples": options.samples,
        "sampler": options.sampler, "steps": steps, "seed": options.seed,
        "levels": [list(s) for s in levels], "mpp": slide.mpp, "summary": summary, "heatmap": scale_meta,
        "files": {k: v for k, v in FILES.items() if k != "json"},
        "regions": len(plan),
    })
    return levels, summary, vmax


__all__ = ["FILES", "RegionMaps", "UncertaintyOptions", "UncertaintyResult", "apply_heatmap", "calibration_warnings",
           "heatmap_lut", "require_diffusion", "resolve_calibration", "uncertainty_slide"]
