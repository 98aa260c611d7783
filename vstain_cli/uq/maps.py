"""Whole-slide uncertainty maps: N stitched samples -> calibrated credible intervals.

``vstain uncertainty`` (docs/uncertainty.md §6-7, docs/architecture.md). Following
Sridhar et al. 2023 (§ uncertainty): draw N diffusion samples per input, take the
per-pixel 5th and 95th percentiles, and scale the interval by lambda in the
calibration's form (multiplicative, Conffusion; or centered, im2im-uq), calibrated
on the validation split with RCPS (Bates et al. 2021; ``vstain calibrate``).

The quantiles are taken over the model's own (unblended) samples, the interval
the calibration speaks about; the tissue weight that fades the section's edge
into white glass is applied afterwards: the mean fades like ``stain``'s output,
and the interval is widened to hold the fade too, never narrowed
(``RegionMaps``). With ``reference`` (the real H&E of the same slide) the
written bounds are checked against it, strip by strip: the empirical coverage
and mean width over tissue go to uncertainty.json.

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

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstain_cli.errors import InputError, OutputExistsError, input_errors
from vstain_cli.infer import stitch
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.infer.wholeslide import (
    MAX_THUMBNAIL,
    RegionSampler,
    RegionStats,
    SlideOptions,
    apply_protocol,
    fit_scale,
    fit_within,
    make_plan,
    open_for_inference,
    region_stream,
    require_diffusion,
)
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.ngff import publish_folder
from vstain_cli.io.outputs import SUFFIX, writer_for
from vstain_cli.io.resample import mask_on_slide_grid, output_size, to_slide_grid
from vstain_cli.io.slides import SlideReader, TiffSlide, open_af, open_he, open_image
from vstain_cli.io.tiff import write_pyramids
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, ensure_writable_dir, fingerprint, record, write_json
from vstain_cli.seeding import SAMPLE_STRIDE
from vstain_cli.train.run_folder import CALIBRATION_FILE
from vstain_cli.uq.compat import CalibrationFile, mismatches
from vstain_cli.uq.intervals import calibrated_interval, sample_quantiles

FILES = {
    "lower": "lower.tif", "upper": "upper.tif", "mean": "mean.tif", "width": "width.tif",
    "width_float": "width.float32.tif", "overlay": "width.png", "json": "uncertainty.json",
}
CHANNELS = 10                  # lower RGB | upper RGB | mean RGB | width
DEFAULT_SAMPLES = 20           # the paper's N, when neither --samples nor a calibration says
STRIP_ROWS = 256
MIN_LEVEL_SIZE = 256
QUANTILE_ROWS = 64             # rows per sort when taking quantiles (bounds the sort's copy)
HIST_BINS_PER_UNIT = 4         # width histogram resolution (0.25 of a 0-255 unit)
LUT_SIZE = 1024
OVERLAY_ALPHA = 0.65


@dataclass
class UncertaintyOptions(SlideOptions):
    """How uncertainty maps are made; recorded in uncertainty.json."""

    samples: int | None = None     # None: the calibration's sample count, else DEFAULT_SAMPLES
    width_max: float | None = None  # heat-map scale top (0-255 units); None: 99th percentile over tissue
    compression: str = "zlib"       # lossless: JPEG would break lower <= mean <= upper per pixel

    def check(self) -> None:
        super().check()
        if self.samples is not None and self.samples < 2:
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
    interval: str = "multiplicative"  # at lambda = 1 both forms are the raw quantile interval
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    made: dict[str, Any] = field(default_factory=dict)  # interval, sampler, steps, eta, samples of the calibration
    samples: int | None = None


def resolve_calibration(run: Run, calibration: str | Path | None) -> ScaleChoice:
    """The given calibration file, else ``RUN/calibration.json`` if present, else lambda = 1."""
    path = Path(calibration) if calibration is not None else run.path / CALIBRATION_FILE
    if calibration is None and not path.exists():
        return ScaleChoice()
    f = CalibrationFile.read(path)  # InputError naming the file when missing or corrupt
    c = f.cal
    return ScaleChoice(c.lam, c.q_low, c.q_high, c.interval, path, f.meta, f.sampling(), c.samples)


def calibration_mismatch(scale: ScaleChoice, sampling: dict[str, Any], samples: int) -> str | None:
    """One line when the maps would be made unlike the calibration (form, sampler, steps, eta, samples)."""
    if scale.path is None:
        return None
    now = {"interval": scale.interval, "sampler": sampling["sampler"], "steps": sampling["steps"],
           "eta": sampling["eta"], "samples": samples}
    diff = mismatches(scale.made, now)
    if not diff:
        return None
    return (f"calibration {scale.path} was made with other settings ({', '.join(diff)}): its lambda does not "
            "hold for these maps; run with the calibration's settings or recalibrate with these")


def calibration_warnings(scale: ScaleChoice, run: Run) -> list[str]:
    """Why the interval may not hold although the settings match: no calibration, or another checkpoint."""
    if scale.path is None:
        return [(f"no calibration ({run.path / CALIBRATION_FILE} not found): lambda = 1, the raw 5-95 % sample "
                 "interval, whose coverage is not guaranteed; run `vstain calibrate` first")]
    made = scale.meta.get("model_step")
    if made is not None and made != run.step:
        return [(f"calibration {scale.path} was made at model step {made}, the model is at step {run.step}: "
                 "its lambda may not hold; recalibrate")]
    return []


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

    Sample k of the region is ``RegionSampler(region, sample_index=k)`` without the
    fade to glass; the per-pixel quantiles (Sridhar et al. 2023: 5th/95th of 20
    samples) are scaled by lambda in the calibration's form
    (``uncertainty.calibrated_interval``, on 0-255) and clipped to [0, 255], which
    no target leaves. Then the tissue weight s (``SlideMask.soft_box``) applies:
    with b(v) = s v + (1 - s) 255, the mean becomes b(mean) (``stain``'s fade) and
    the interval the hull of [l, u] and [b(l), b(u)], i.e. [l, b(u)], so a faded
    pixel keeps the model's interval (blending the samples first would shrink it
    by s); glass (s = 0) is white with zero width, as ``stain`` writes it. Width =
    mean over RGB of upper - lower.
    """

    def __init__(self, sampler: RegionSampler, samples: int, scale: ScaleChoice, progress: Progress) -> None:
        self.sampler, self.n, self.scale, self.progress = sampler, samples, scale, progress
        sampler.blend_glass = False

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
        soft = self.sampler.mask.soft_box(y0, y1, x0, x1)[..., None]
        s = self.scale
        for r in range(0, h, QUANTILE_ROWS):
            lo, hi, med, mean = sample_quantiles(stack[:, r:r + QUANTILE_ROWS], s.q_low, s.q_high)
            lo, hi = calibrated_interval(lo, hi, med, s.lam, s.interval, (0.0, 255.0))
            lo, hi = np.clip(lo, 0.0, 255.0), np.clip(hi, 0.0, 255.0)
            wt = soft[r:r + QUANTILE_ROWS]
            hi = np.maximum(hi, hi * wt + 255.0 * (1.0 - wt))  # the fade to white, held by the interval
            lo = np.where(wt > 0, lo, 255.0)   # glass: white, as stain writes it (no promise there)
            rows = out[r:r + QUANTILE_ROWS]
            rows[..., 0:3], rows[..., 3:6], rows[..., 6:9] = lo, hi, mean * wt + 255.0 * (1.0 - wt)
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


class ReferenceCoverage:
    """Coverage of the real H&E of the same slide by the written bounds, over tissue, streamed.

    Per pixel-channel on the AF tissue mask (the calibration's risk unit), with
    inclusive bounds: the fraction of reference values in [lower, upper] and the
    mean width (RGB mean of upper - lower, 0-255 units) of the same pixels.
    The reference is read strip by strip (``SlideReader.read_region``).
    """

    def __init__(self, reader: SlideReader, path: Path) -> None:
        self.reader, self.path = reader, path
        self.inside = 0
        self.values = 0
        self.width_sum = 0.0
        self.pixels = 0

    def add(self, y: int, lower: np.ndarray, upper: np.ndarray, tissue: np.ndarray) -> None:
        if not tissue.any():
            return
        h, w = tissue.shape
        ref = np.asarray(self.reader.read_region(0, y, w, h))[..., :3]
        t = ref[tissue]
        lo, hi = lower[tissue], upper[tissue]
        self.inside += int(((t >= lo) & (t <= hi)).sum())
        self.values += t.size
        self.width_sum += float((hi.astype(np.float64) - lo).mean(axis=-1).sum())
        self.pixels += int(tissue.sum())

    def summary(self, alpha: float | None) -> dict[str, Any]:
        cov = self.inside / self.values if self.values else None
        return {
            "reference": str(self.path), "coverage": cov, "values": self.values, "tissue_pixels": self.pixels,
            "mean_width_tissue": self.width_sum / self.pixels if self.pixels else None,
            "nominal_coverage": None if alpha is None else 1.0 - alpha,
            "unit": "pixel-channel values of the reference H&E inside [lower, upper] (uint8, inclusive), "
                    "on the AF tissue mask; width in 0-255 RGB units",
        }


def map_strips(strips: Iterator[np.ndarray], mask: SlideMask, stats: WidthStats,
               reference: ReferenceCoverage | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Blended 10-channel strips -> (lower, upper, mean uint8 RGB, width float32), with stats."""
    y = 0
    for strip in strips:
        for r in range(0, strip.shape[0], STRIP_ROWS):  # small pieces: small conversion and queue copies
            s = strip[r:r + STRIP_ROWS]
            h, w = s.shape[:2]
            width = np.ascontiguousarray(s[..., 9])
            tissue = mask.box(y, y + h, 0, w)
            stats.add(width, tissue)
            lower, upper = _as_u8(s[..., 0:3]), _as_u8(s[..., 3:6])
            if reference is not None:
                reference.add(y, lower, upper, tissue)
            y += h
            yield lower, upper, _as_u8(s[..., 6:9]), width[..., None]
        strip = s = None  # drop the float32 rows before the blender fills the next region row


def open_reference(path: Path, height: int, width: int) -> SlideReader:
    """The real H&E of the slide (``open_he``); InputError unless it is RGB and of the AF slide's size."""
    reader = open_he(path)
    if (reader.width, reader.height) != (width, height) or reader.channels < 3:
        size = f"{reader.width}x{reader.height} px, {reader.channels} channels"
        reader.close()
        raise InputError(f"--reference is {size}, the AF slide is {width}x{height} px: give the registered "
                         "H&E of the same slide at level 0", path)
    return reader


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
    with open_image(width_path) as t:
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
    """Width heat map alpha-blended over the mean-stain thumbnail (tissue only), with a colour bar.

    The image part is at most ``max_size`` px on its long side and the PNG, colour bar
    included, at most MAX_THUMBNAIL on each side: the thumbnails are area-averaged to fit.
    """
    from PIL import Image, ImageDraw

    bar_h, pad = 14, 16
    max_size = min(max_size, MAX_THUMBNAIL)
    with open_image(mean_path) as t:
        base, _ = t.thumbnail(max_size)
    with open_image(width_path) as t:
        wthumb, _ = t.thumbnail(max_size)
    fit_h = min(max_size, MAX_THUMBNAIL - bar_h - 2 * pad)  # room for the colour bar below the image
    base, wthumb = fit_within(base, fit_h, max_size), fit_within(wthumb.astype(np.float32), fit_h, max_size)
    h, w = base.shape[:2]
    ys = np.minimum((np.arange(h) * mask.mask.shape[0] / h).astype(int), mask.mask.shape[0] - 1)
    xs = np.minimum((np.arange(w) * mask.mask.shape[1] / w).astype(int), mask.mask.shape[1] - 1)
    alpha = np.float32(OVERLAY_ALPHA) * mask.mask[ys[:, None], xs[None, :]][..., None].astype(np.float32)
    img = base[..., :3].astype(np.float32)
    img += alpha * (apply_heatmap(wthumb[..., 0], vmax, heatmap_lut()) - img)  # alpha blend, in place
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
    samples: int = DEFAULT_SAMPLES
    interval: str = "multiplicative"
    sampling: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    scale: dict[str, Any] | None = None  # the slide-scale decision (``SlideScale.as_dict``)


def uncertainty_slide(
    af_path: str | Path,
    model: str | Path | Run,
    out: str | Path,
    options: UncertaintyOptions | None = None,
    *,
    calibration: str | Path | None = None,
    reference: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> UncertaintyResult | None:
    """Per-pixel credible-interval maps of a whole AF slide (None on torchrun ranks > 0).

    ``reference``: the real H&E of the same slide (registered, same size); the
    coverage of its tissue pixels by the written bounds is measured and recorded.
    InputError when the calibration was made with another interval form, sampler,
    step count, eta or sample count than the maps would use.
    """
    options = options or UncertaintyOptions()
    with input_errors():
        options.check()
    progress = progress or NullProgress()
    af_path, out = Path(af_path), Path(out)
    ref_path = None if reference is None else Path(reference)
    if ref_path is not None and not ref_path.is_file():
        raise InputError("reference H&E slide not found (--reference)", ref_path)
    rank = int(os.environ.get("RANK", "0"))  # torchrun: every rank samples, rank 0 writes
    t0 = time.perf_counter()
    with open_af(af_path):  # the AF slide (a file, or an OME-Zarr folder) is checked first, before the model
        pass
    run = resolve_run(model, options.device)
    require_diffusion(run)
    inputs = [af_path, run.path] + [Path(p) for p in (calibration, reference) if p is not None]
    if rank == 0:
        check_output_folder(out, force, inputs)
    scale = resolve_calibration(run, calibration)
    options, sampling = apply_protocol(options, run)
    if sampling["steps"] > run.schedule.T:
        raise InputError(f"--steps {sampling['steps']} exceeds the model's T = {run.schedule.T} steps", run.path)
    samples = options.samples or scale.samples or DEFAULT_SAMPLES
    options = replace(options, samples=samples)
    mismatch = calibration_mismatch(scale, sampling, samples)
    if mismatch:
        raise InputError(mismatch)
    run, slide = open_for_inference(af_path, run, options.device)
    ref = None
    try:
        slide, grid = fit_scale(run, slide, options)  # the model's µm/px; maps at the slide's
        mask = SlideMask(slide, run.tile_size)
        if mask.empty:
            raise InputError("no tissue found in the AF slide (nothing to measure)", af_path)
        for message in grid.warnings if rank == 0 else []:  # once the inputs are known to be usable
            progress.warn(message)
        if ref_path is not None and rank == 0:
            ref = ReferenceCoverage(open_reference(ref_path, *output_size(slide)), ref_path)
        for message in calibration_warnings(scale, run) if rank == 0 else []:
            progress.warn(message)
        plan = make_plan(slide, run, options)
        sampler = _CachingSampler(run, slide, mask, options)
        regions = region_stream(plan, RegionMaps(sampler, samples, scale, progress), out, progress)
        if rank != 0:
            for _ in regions:
                pass
            return None
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            result = _write_outputs(tmp, af_path, run, slide, mask, plan, regions, options, scale, sampling,
                                    sampler, ref, progress, grid)
            publish_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        slide.close()
        if ref is not None:
            ref.reader.close()
    files = {k: out / v for k, v in output_files(options.out_format).items()}
    levels, summary, vmax, checked = result
    return UncertaintyResult(out, files, scale.lam, scale.path, levels, summary, vmax,
                             time.perf_counter() - t0, sampler.stats, samples, scale.interval, sampling, checked,
                             grid.as_dict())


def output_files(fmt: str) -> dict[str, str]:
    """``FILES`` with the image maps named for the output format (``.tif`` or ``.zarr``)."""
    return {k: v[: -len(".tif")] + SUFFIX[fmt] if v.endswith(".tif") else v for k, v in FILES.items()}


def _map_text(scale: ScaleChoice, q: float) -> str:
    form = "around the median" if scale.interval == "centered" else "as [l / lambda, u * lambda] on [0, 1]"
    return f"quantile {q} scaled by lambda {scale.lam} ({scale.interval}: {form}), then the fade to glass"


def _write_outputs(tmp: Path, af_path: Path, run: Run, slide: TiffSlide, mask: SlideMask, plan, regions,
                   options: UncertaintyOptions, scale: ScaleChoice, sampling: dict[str, Any],
                   sampler: RegionSampler, reference: ReferenceCoverage | None, progress: Progress,
                   grid: Any = None) -> tuple[list[tuple[int, int]], dict[str, Any], float, dict[str, Any] | None]:
    """Both passes into the temp folder: maps + float width, then heat map, PNG and JSON.

    Regions are computed on ``slide`` (the model's scale); the maps are written on the
    original slide's grid (``io/resample``: identical unless the slide was resampled).
    """
    H, W = output_size(slide)
    FILES = output_files(options.out_format)  # noqa: N806 - the module table, in the output format
    out_mpp = grid.out_mpp if grid is not None else slide.mpp
    config = {
        "uncertainty": asdict(options), "steps_effective": sampling["steps"], "sampling": sampling,
        "model": str(run.path), "model_kind": run.kind, "model_step": run.step, "window_overlap": sampler.overlap,
        "lam": scale.lam, "interval": scale.interval, "q_low": scale.q_low, "q_high": scale.q_high,
        "calibration": None if scale.path is None else str(scale.path),
        "reference": None if reference is None else str(reference.path),
        "sample_seeds": f"noise seed {options.seed} + {SAMPLE_STRIDE} k for sample k",
        "scale": None if grid is None else grid.as_dict(),
    }
    inputs = {"af": fingerprint(af_path)}
    if (run.path / "config.json").exists():
        inputs["model_config"] = fingerprint(run.path / "config.json")
    if scale.path is not None:
        inputs["calibration"] = fingerprint(scale.path)
    if reference is not None:
        inputs["reference"] = fingerprint(reference.path)
    meta = record(config, inputs)
    common = dict(height=H, width=W, mpp=out_mpp, compression=options.compression,
                  min_level_size=MIN_LEVEL_SIZE, writer=writer_for(options.out_format))
    specs = [
        dict(path=tmp / FILES["lower"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"lower bound, {_map_text(scale, scale.q_low)}"}, **common),
        dict(path=tmp / FILES["upper"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"upper bound, {_map_text(scale, scale.q_high)}"}, **common),
        dict(path=tmp / FILES["mean"], samples=3, dtype=np.uint8,
             metadata={**meta, "map": f"mean of {options.samples} samples"}, **common),
        dict(path=tmp / FILES["width_float"], samples=1, dtype=np.float32,
             metadata={**meta, "map": "interval width upper - lower, mean over RGB, 0-255 units"}, **common),
    ]
    stats = WidthStats()
    strips = to_slide_grid(_blended(plan, regions, slide.height, slide.width), slide)
    write_pyramids(specs, map_strips(strips, mask_on_slide_grid(mask, slide), stats, reference), queue_size=1)
    summary = stats.summary()
    alpha = scale.meta.get("alpha") if scale.path is not None else None
    checked = None if reference is None else reference.summary(None if alpha is None else float(alpha))
    vmax = float(options.width_max) if options.width_max else nice_ceiling(summary["p99_width_tissue"])
    scale_meta = {"colormap": "viridis", "vmin": 0.0, "vmax": vmax, "unit": "0-255 RGB units",
                  "value_to_width": f"colour position p in [0, 1] (viridis, dark -> yellow) = width / {vmax:g}, "
                                    "clipped at 1"}
    progress.start("heatmap", "width heat map", None)
    levels = writer_for(options.out_format)(
        tmp / FILES["width"], _heatmap_strips(tmp / FILES["width_float"], H, W, vmax), H, W, 3, np.uint8,
        metadata={**meta, "map": "interval width heat map", "heatmap": scale_meta},
        **{k: v for k, v in common.items() if k not in ("height", "width", "writer")})
    write_overlay_png(tmp / FILES["mean"], tmp / FILES["width_float"], mask, tmp / FILES["overlay"], vmax)
    progress.finish("heatmap")
    write_json(tmp / FILES["json"], {
        "format": "vstain-uncertainty", "format_version": 2, **meta,
        "lam": scale.lam, "interval": scale.interval, "calibration": config["calibration"],
        "samples": options.samples, "protocol": sampling["protocol"], "sampler": sampling["sampler"],
        "steps": sampling["steps"], "eta": sampling["eta"], "seed": options.seed,
        "levels": [list(s) for s in levels], "mpp": out_mpp, "summary": summary, "heatmap": scale_meta,
        "reference_check": checked,
        "files": {k: v for k, v in FILES.items() if k != "json"},
        "regions": len(plan),
    })
    return levels, summary, vmax, checked


__all__ = ["FILES", "DEFAULT_SAMPLES", "RegionMaps", "ReferenceCoverage", "UncertaintyOptions", "UncertaintyResult",
           "apply_heatmap", "calibration_mismatch", "calibration_warnings", "heatmap_lut", "require_diffusion",
           "resolve_calibration", "uncertainty_slide"]
