"""The ``uncertainty`` region op: N samples per region -> calibrated interval maps, and their statistics.

``MapsOp`` samples every region N times (``RegionMaps``), hands the engine
(``infer/engine``) 10 channels to blend (lower, upper, mean RGB and the width),
and at the end writes the maps, the width heat map (``uq/heatmap``) and
uncertainty.json into the output folder, with the width statistics over tissue
(``WidthStats``) and, given the real H&E, its coverage (``ReferenceCoverage``).
See ``uq/maps`` for the method and the outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstain_cli.errors import InputError
from vstain_cli.infer import stitch
from vstain_cli.infer.engine import SlideRun
from vstain_cli.infer.run import Run
from vstain_cli.infer.wholeslide import RegionSampler, RegionStats, SlideOptions, require_diffusion
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.outputs import SUFFIX, FolderOutput, writer_for
from vstain_cli.io.resample import mask_on_slide_grid
from vstain_cli.io.slides import SlideReader, open_he
from vstain_cli.io.tiff import write_pyramids
from vstain_cli.progress import Progress
from vstain_cli.provenance import fingerprint, record, write_json
from vstain_cli.runtime import place
from vstain_cli.seeding import SAMPLE_STRIDE
from vstain_cli.train.run_folder import CALIBRATION_FILE, CONFIG
from vstain_cli.uq.compat import CalibrationFile, mismatches
from vstain_cli.uq.heatmap import as_u8, heatmap_strips, nice_ceiling, write_overlay_png
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
            lower, upper = as_u8(s[..., 0:3]), as_u8(s[..., 3:6])
            if reference is not None:
                reference.add(y, lower, upper, tissue)
            y += h
            yield lower, upper, as_u8(s[..., 6:9]), width[..., None]
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


def output_files(fmt: str) -> dict[str, str]:
    """``FILES`` with the image maps named for the output format (``.tif`` or ``.zarr``)."""
    return {k: v[: -len(".tif")] + SUFFIX[fmt] if v.endswith(".tif") else v for k, v in FILES.items()}


def _map_text(scale: ScaleChoice, q: float) -> str:
    form = "around the median" if scale.interval == "centered" else "as [l / lambda, u * lambda] on [0, 1]"
    return f"quantile {q} scaled by lambda {scale.lam} ({scale.interval}: {form}), then the fade to glass"




# ----------------------------------------------------------------------------- the op


class MapsOp:
    """The ``uncertainty`` region op: N samples per region -> 10 map channels; a folder of maps at the end.

    ``calibration``: the calibration file (None: ``RUN/calibration.json`` if present,
    else lambda = 1); ``reference``: the real H&E of the same slide, whose coverage
    by the written bounds is measured.
    """

    channels = CHANNELS
    nothing_to_do = "nothing to measure"

    def __init__(self, calibration: str | Path | None = None, reference: str | Path | None = None) -> None:
        self.calibration = None if calibration is None else Path(calibration)
        self.reference = None if reference is None else Path(reference)
        if self.reference is not None and not self.reference.is_file():
            raise InputError("reference H&E slide not found (--reference)", self.reference)
        self.scale = ScaleChoice()
        self.sampler: RegionSampler | None = None
        self.maps: RegionMaps | None = None

    def accept(self, run: Run) -> None:
        require_diffusion(run)
        self.scale = resolve_calibration(run, self.calibration)

    def inputs(self) -> list[Path]:
        return [p for p in (self.calibration, self.reference) if p is not None]

    def calibrated_sampling(self, run: Run) -> dict[str, Any] | None:
        return self.scale.made if self.scale.path is not None else None

    def prepare(self, ctx: SlideRun) -> int:
        samples = ctx.options.samples or self.scale.samples or DEFAULT_SAMPLES
        ctx.options.samples = samples
        mismatch = calibration_mismatch(self.scale, ctx.sampling, samples)
        if mismatch:
            raise InputError(mismatch)
        if place().is_main:
            for message in calibration_warnings(self.scale, ctx.run):
                ctx.progress.warn(message)
        self.sampler = _CachingSampler(ctx.run, ctx.slide, ctx.mask, ctx.options)
        self.maps = RegionMaps(self.sampler, samples, self.scale, ctx.progress)
        return ctx.sampling["steps"] * samples

    def __call__(self, region: stitch.Region) -> np.ndarray:
        return self.maps(region)

    def finish(self, strips: Iterator[np.ndarray], ctx: SlideRun, target: FolderOutput) -> UncertaintyResult:
        ref = None
        if self.reference is not None:
            ref = ReferenceCoverage(open_reference(self.reference, *ctx.out_size), self.reference)
        try:
            with target.publish() as tmp:
                levels, summary, vmax, checked = self._write(tmp, strips, ctx, ref)
        finally:
            if ref is not None:
                ref.reader.close()
        o = ctx.options
        files = {k: target.path / v for k, v in output_files(o.out_format or "tiff").items()}
        return UncertaintyResult(target.path, files, self.scale.lam, self.scale.path, levels, summary, vmax, 0.0,
                                 self.sampler.stats, o.samples, self.scale.interval, ctx.sampling, checked,
                                 ctx.scale.as_dict())

    def _write(self, tmp: Path, strips: Iterator[np.ndarray], ctx: SlideRun, reference: ReferenceCoverage | None
               ) -> tuple[list[tuple[int, int]], dict[str, Any], float, dict[str, Any] | None]:
        """Both passes into the temp folder: maps + float width, then heat map, PNG and JSON."""
        options, run, scale, sampling = ctx.options, ctx.run, self.scale, ctx.sampling
        fmt = options.out_format or "tiff"
        files = output_files(fmt)
        H, W = ctx.out_size
        out_mpp = ctx.scale.out_mpp
        config = {
            "uncertainty": asdict(options), "steps_effective": sampling["steps"], "sampling": sampling,
            "model": str(run.path), "model_kind": run.kind, "model_step": run.step,
            "window_overlap": self.sampler.overlap,
            "lam": scale.lam, "interval": scale.interval, "q_low": scale.q_low, "q_high": scale.q_high,
            "calibration": None if scale.path is None else str(scale.path),
            "reference": None if reference is None else str(reference.path),
            "sample_seeds": f"noise seed {options.seed} + {SAMPLE_STRIDE} k for sample k",
            "scale": ctx.scale.as_dict(),
        }
        inputs = {"af": fingerprint(ctx.af_path)}
        if (run.path / CONFIG).exists():
            inputs["model_config"] = fingerprint(run.path / CONFIG)
        if scale.path is not None:
            inputs["calibration"] = fingerprint(scale.path)
        if reference is not None:
            inputs["reference"] = fingerprint(reference.path)
        meta = record(config, inputs)
        writer = writer_for(fmt)
        common = dict(height=H, width=W, mpp=out_mpp, compression=options.compression,
                      min_level_size=MIN_LEVEL_SIZE, writer=writer)
        specs = [
            dict(path=tmp / files["lower"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": f"lower bound, {_map_text(scale, scale.q_low)}"}, **common),
            dict(path=tmp / files["upper"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": f"upper bound, {_map_text(scale, scale.q_high)}"}, **common),
            dict(path=tmp / files["mean"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": f"mean of {options.samples} samples"}, **common),
            dict(path=tmp / files["width_float"], samples=1, dtype=np.float32,
                 metadata={**meta, "map": "interval width upper - lower, mean over RGB, 0-255 units"}, **common),
        ]
        stats = WidthStats()
        mask = mask_on_slide_grid(ctx.mask, ctx.slide)
        write_pyramids(specs, map_strips(strips, mask, stats, reference), queue_size=1)
        summary = stats.summary()
        alpha = scale.meta.get("alpha") if scale.path is not None else None
        checked = None if reference is None else reference.summary(None if alpha is None else float(alpha))
        vmax = float(options.width_max) if options.width_max else nice_ceiling(summary["p99_width_tissue"])
        scale_meta = {"colormap": "viridis", "vmin": 0.0, "vmax": vmax, "unit": "0-255 RGB units",
                      "value_to_width": f"colour position p in [0, 1] (viridis, dark -> yellow) = width / {vmax:g}, "
                                        "clipped at 1"}
        ctx.progress.start("heatmap", "width heat map", None)
        levels = writer(tmp / files["width"], heatmap_strips(tmp / files["width_float"], H, W, vmax), H, W, 3,
                        np.uint8, metadata={**meta, "map": "interval width heat map", "heatmap": scale_meta},
                        mpp=out_mpp, compression=options.compression, min_level_size=MIN_LEVEL_SIZE)
        write_overlay_png(tmp / files["mean"], tmp / files["width_float"], ctx.mask, tmp / files["overlay"], vmax)
        ctx.progress.finish("heatmap")
        write_json(tmp / files["json"], {
            "format": "vstain-uncertainty", "format_version": 2, **meta,
            "lam": scale.lam, "interval": scale.interval, "calibration": config["calibration"],
            "samples": options.samples, "protocol": sampling["protocol"], "sampler": sampling["sampler"],
            "steps": sampling["steps"], "eta": sampling["eta"], "seed": options.seed,
            "levels": [list(s) for s in levels], "mpp": out_mpp, "summary": summary, "heatmap": scale_meta,
            "reference_check": checked,
            "files": {k: v for k, v in files.items() if k != "json"},
            "regions": len(ctx.plan),
        })
        return levels, summary, vmax, checked
