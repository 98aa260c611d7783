"""The ``uncertainty`` region op: a region -> calibrated interval maps, and their statistics.

``MapsOp`` gets each region's interval from its run: a diffusion run is sampled N
times (``RegionMaps``: per-pixel quantiles of the samples), an interval run
(``vstain distill --intervals``) gives its bounds in one network call per window,
feather-blended over the windows like a regression output (``RegionBounds``).
Either way the engine (``infer/engine``) blends 10 channels (lower, upper, mean RGB
and the width), plus 6 per structure scale (``--scale``: the calibrated interval
of block means, ``BlockScale``), and at the end the op writes the maps, the width
heat map (``uq/heatmap``), the block maps (``BlockRows``) and uncertainty.json into
the output folder, with the width statistics over tissue (``WidthStats``) and,
given the real H&E, its coverage (``ReferenceCoverage``). See ``uq/maps`` for the
method and the outputs.
"""

from __future__ import annotations

import time
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
from vstain_cli.uq.intervals import Calibration, bounds_interval, calibrated_interval, sample_quantiles, scale_interval

FILES = {
    "lower": "lower.tif", "upper": "upper.tif", "mean": "mean.tif", "width": "width.tif",
    "width_float": "width.float32.tif", "overlay": "width.png", "json": "uncertainty.json",
}
CHANNELS = 10                  # lower RGB | upper RGB | mean RGB | width
SCALE_CHANNELS = 6             # per --scale: lower RGB | upper RGB of the block means, broadcast over each block
INTERVAL_KIND = "interval"     # Run.kind of a one-pass interval run (`vstain distill --intervals`)
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
    scales: tuple[float, ...] = ()  # structure scales (µm) whose block-mean maps are written too (--scale)

    def check(self) -> None:
        super().check()
        for um in self.scales:
            if not (np.isfinite(um) and um > 0):
                raise ValueError(f"--scale must be a positive length in µm, got {um:g}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"--scale given twice ({', '.join(f'{um:g}' for um in self.scales)})")
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
    source: str = "samples"              # "samples" (N diffusion samples) or "bounds" (an interval run, one pass)
    scales: list[dict[str, Any]] = field(default_factory=list)  # per --scale: block size, lambda, width summary




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
    source: str = "samples"            # what the calibration scales: "samples" or "bounds" (an interval run)
    file: CalibrationFile | None = None


def resolve_calibration(run: Run, calibration: str | Path | None) -> ScaleChoice:
    """The given calibration file, else ``RUN/calibration.json`` if present, else lambda = 1."""
    path = Path(calibration) if calibration is not None else run.path / CALIBRATION_FILE
    if calibration is None and not path.exists():
        return ScaleChoice()
    f = CalibrationFile.read(path)  # InputError naming the file when missing or corrupt
    c = f.cal
    return ScaleChoice(c.lam, c.q_low, c.q_high, c.interval, path, f.meta, f.sampling(), c.samples, c.source, f)


SOURCE_OF_RUN = {"samples": "N samples of a diffusion run", "bounds": "the bounds of an interval run"}


def check_source(scale: ScaleChoice, source: str, run: Run) -> None:
    """InputError when the calibration was made for another kind of interval than the run gives."""
    if scale.path is not None and scale.source != source:
        raise InputError(f"calibrates {SOURCE_OF_RUN.get(scale.source, scale.source)}, but {run.path.name} is a "
                         f"{run.kind} run ({SOURCE_OF_RUN[source]}): calibrate this run with `vstain calibrate "
                         f"--model {run.path}`", scale.path)


@dataclass
class BlockScale:
    """One ``--scale``: maps of the interval of ``block_px`` x ``block_px`` block means (``um`` µm asked for,
    ``block_um`` at the calibration tiles' mpp), with that scale's calibration ``cal``.

    ``block_px`` is on the model's grid (the calibration tiles are at the training
    scale); ``block_out`` is the block on the output (slide) grid, set by ``MapsOp.prepare``.
    """

    um: float
    block_px: int
    block_um: float
    cal: Calibration
    block_out: int = 0

    @property
    def tag(self) -> str:
        """File-name tag of the scale, e.g. "4um"."""
        return f"{self.um:g}um"


def resolve_block_scales(scale: ScaleChoice, scales: tuple[float, ...], run: Run) -> list[BlockScale]:
    """The calibrations of the ``--scale`` values; InputError in one line naming the calibration file when a
    scale was not calibrated (or when there is no calibration at all)."""
    if not scales:
        return []
    if scale.path is None or scale.file is None:
        raise InputError(f"--scale {', '.join(f'{um:g}' for um in scales)} µm needs a calibration of that scale "
                         f"(no calibration found): run `vstain calibrate --model {run.path} --scale UM ...`",
                         run.path / CALIBRATION_FILE)
    out = []
    for um in scales:
        s = scale.file.scale(um)  # InputError naming the file and the scales it has
        if s.cal.source != scale.source:
            raise InputError(f"corrupt calibration file (scale {um:g} µm calibrates {s.cal.source}, the file "
                             f"{scale.source})", scale.path)
        out.append(BlockScale(float(um), s.block_px, s.block_um, s.cal))
    return out


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
        raw = "the run's raw bounds" if run.kind == INTERVAL_KIND else "the raw 5-95 % sample interval"
        return [(f"no calibration ({run.path / CALIBRATION_FILE} not found): lambda = 1, {raw}, whose coverage "
                 "is not guaranteed; run `vstain calibrate` first")]
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


def _faded(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, mean: np.ndarray, wt: np.ndarray) -> None:
    """Fill map rows (.., 10) from a calibrated interval and mean (0-255) with the tissue weight ``wt``.

    With b(v) = wt v + (1 - wt) 255: the mean becomes b(mean) (``stain``'s fade), the
    interval the hull of [l, u] and [b(l), b(u)], i.e. [l, b(u)]; glass (wt = 0) is
    white with zero width. Width = mean over RGB of upper - lower.
    """
    hi = np.maximum(hi, hi * wt + 255.0 * (1.0 - wt))  # the fade to white, held by the interval
    lo = np.where(wt > 0, lo, 255.0)   # glass: white, as stain writes it (no promise there)
    rows[..., 0:3], rows[..., 3:6], rows[..., 6:9] = lo, hi, mean * wt + 255.0 * (1.0 - wt)
    rows[..., 9] = (hi - lo).mean(axis=-1)


def _glass(h: int, w: int, channels: int) -> np.ndarray:
    """A region without tissue: every map white, zero width (block maps too)."""
    out = np.full((h, w, channels), 255.0, np.float32)
    out[..., 9] = 0.0
    return out


def _block_edges(start: int, stop: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The slide-aligned blocks (y // block) met by [start, stop): their first offsets from ``start`` and sizes."""
    first = np.arange((start // block) * block, stop, block)
    lo = np.maximum(first, start)
    return lo - start, np.minimum(first + block, stop) - lo


def _region_block_means(x: np.ndarray, ey: tuple[np.ndarray, np.ndarray], ex: tuple[np.ndarray, np.ndarray]
                        ) -> np.ndarray:
    """Means of ``x`` (..., h, w, C) over the blocks ``ey`` x ``ex`` (``_block_edges``) -> (..., nby, nbx, C)."""
    sums = np.add.reduceat(np.add.reduceat(x, ey[0], axis=-3, dtype=np.float64), ex[0], axis=-2)
    return (sums / (ey[1][:, None, None] * ex[1][None, :, None])).astype(np.float32)


def block_channels(data: Any, source: str, scales: list[BlockScale], y0: int, x0: int, soft: np.ndarray
                   ) -> np.ndarray:
    """The --scale channels of one region: (h, w, 6 per scale), lower and upper RGB of the block means.

    ``data``: the region's N samples (N, h, w, 3) or an interval run's (lower, upper)
    (each (h, w, 3)), 0-255, before any fade. Blocks are aligned to the slide grid
    (y // block, x // block), so neighbouring regions compute the same blocks; a block
    cut by the region's outer edge averages the pixels the region has (its blend
    weight there is small). Per block: the base interval of the block means (sample
    quantiles, or the block means of the bounds), scaled by the scale's lambda
    (``intervals.scale_interval``), clipped to 0-255, then the block's mean tissue
    weight fades it as ``_faded`` does per pixel. Broadcast back over each block's
    pixels, so the engine blends them like any map.
    """
    h, w = soft.shape[:2]
    out = np.empty((h, w, SCALE_CHANNELS * len(scales)), np.float32)
    for k, sc in enumerate(scales):
        ey, ex = _block_edges(y0, y0 + h, sc.block_px), _block_edges(x0, x0 + w, sc.block_px)
        if source == "bounds":
            blocks: Any = (_region_block_means(data[0], ey, ex), _region_block_means(data[1], ey, ex))
        else:
            blocks = _region_block_means(data, ey, ex)
        lo, hi = scale_interval(blocks, sc.cal, (0.0, 255.0))
        lo, hi = np.clip(lo, 0.0, 255.0), np.clip(hi, 0.0, 255.0)
        wt = _region_block_means(soft, ey, ex)
        hi = np.maximum(hi, hi * wt + 255.0 * (1.0 - wt))
        lo = np.where(wt > 0, lo, 255.0)
        both = np.concatenate([lo, hi], axis=-1)
        out[..., SCALE_CHANNELS * k:SCALE_CHANNELS * (k + 1)] = np.repeat(np.repeat(both, ey[1], axis=0), ex[1],
                                                                          axis=1)
    return out


class RegionMaps:
    """One region -> (outer h, outer w, 10 + 6 per scale) float32: lower, upper, mean RGB and width (0-255).

    Sample k of the region is ``RegionSampler(region, sample_index=k)`` without the
    fade to glass; the per-pixel quantiles (Sridhar et al. 2023: 5th/95th of 20
    samples) are scaled by lambda in the calibration's form
    (``uncertainty.calibrated_interval``, on 0-255) and clipped to [0, 255], which
    no target leaves. Then the tissue weight s (``SlideMask.soft_box``) applies
    (``_faded``): the mean fades like ``stain``'s output and the interval holds the
    fade (blending the samples first would shrink it by s); glass (s = 0) is
    white with zero width, as ``stain`` writes it. With ``scales``, the block-mean
    intervals of the same samples follow (``block_channels``).
    """

    def __init__(self, sampler: RegionSampler, samples: int, scale: ScaleChoice, progress: Progress,
                 scales: list[BlockScale] | None = None) -> None:
        self.sampler, self.n, self.scale, self.progress = sampler, samples, scale, progress
        self.scales = scales or []
        sampler.blend_glass = False

    def __call__(self, region: stitch.Region) -> np.ndarray:
        y0, y1, x0, x1 = region.outer
        h, w = y1 - y0, x1 - x0
        channels = CHANNELS + SCALE_CHANNELS * len(self.scales)
        if not self.sampler.mask.box(y0, y1, x0, x1).any():  # glass: every sample is white
            self.sampler.stats.regions += 1
            self.sampler.stats.regions_background += 1
            return _glass(h, w, channels)
        out = np.empty((h, w, channels), np.float32)
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
            _faded(out[r:r + QUANTILE_ROWS], lo, hi, mean, soft[r:r + QUANTILE_ROWS])
        if self.scales:
            out[..., CHANNELS:] = block_channels(stack, "samples", self.scales, y0, x0, soft)
        return out


class RegionBounds:
    """One region of an interval run -> the same channels as ``RegionMaps``, in one network call per window.

    The run's (lower, upper) (``Run.interval``, Conffusion-style bounds, Horwitz &
    Hoshen 2022) of every window are feather-blended like a regression output
    (``stitch.blend_predictions``: a convex combination per pixel, so lower <= upper
    holds), ordered per value (``intervals.bounds_interval``), scaled by the
    calibration's lambda around their midpoint (``calibrated_interval`` on 0-255),
    clipped, then faded (``_faded``); the mean map is the midpoint. No samples.
    """

    def __init__(self, sampler: RegionSampler, scale: ScaleChoice, scales: list[BlockScale] | None = None) -> None:
        self.sampler, self.scale, self.scales = sampler, scale, scales or []
        self.calls = 0  # network calls (window batches)

    def bounds(self, region: stitch.Region, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The blended raw (lower, upper) of the region's outer box, (h, w, 3) each, 0-255; white where no
        window was evaluated."""
        sp, run = self.sampler, self.sampler.run
        y0, y1, x0, x1 = region.outer
        af = sp.slide.read_region(x0, y0, x1 - x0, y1 - y0).transpose(2, 0, 1)
        a = torch.from_numpy(run.normalize(af))[None].to(run.device)

        def both(windows: torch.Tensor) -> torch.Tensor:
            lo, hi = run.interval(windows)
            sp.stats.windows += windows.shape[0]
            self.calls += 1
            return torch.cat([lo, hi], dim=1)

        t0 = time.perf_counter()
        pred = stitch.blend_predictions(both, a, sp.window, sp.overlap, sp.o.batch_size, mask=mask)
        sp.stats.sample_seconds += time.perf_counter() - t0
        px = ((pred[0].float().clamp(-1, 1) + 1.0) * 127.5).permute(1, 2, 0).cpu().numpy()
        return px[..., :3], px[..., 3:]

    def __call__(self, region: stitch.Region) -> np.ndarray:
        sp = self.sampler
        y0, y1, x0, x1 = region.outer
        h, w = y1 - y0, x1 - x0
        channels = CHANNELS + SCALE_CHANNELS * len(self.scales)
        m = sp.mask.box(y0, y1, x0, x1)
        sp.stats.regions += 1
        if not m.any():
            sp.stats.regions_background += 1
            return _glass(h, w, channels)
        raw_lo, raw_hi = self.bounds(region, m)
        soft = sp.mask.soft_box(y0, y1, x0, x1)[..., None]
        s = self.scale
        out = np.empty((h, w, channels), np.float32)
        lo, hi, mid = bounds_interval(raw_lo, raw_hi)
        lo, hi = calibrated_interval(lo, hi, mid, s.lam, s.interval, (0.0, 255.0))
        _faded(out, np.clip(lo, 0.0, 255.0), np.clip(hi, 0.0, 255.0), mid, soft)
        if self.scales:
            out[..., CHANNELS:] = block_channels((raw_lo, raw_hi), "bounds", self.scales, y0, x0, soft)
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


class BlockRows:
    """One --scale's blended channels (lower, upper RGB broadcast over blocks) -> rows of its block maps.

    Strips of the output grid come in; whole rows of ``block`` x ``block`` px blocks
    (aligned to y = 0, x = 0; the last partial block row and column are dropped, as
    ``intervals.block_means`` drops them in calibration) go out as (lower, upper
    uint8 RGB, width float32) at block resolution. Fewer than ``block`` rows are held.
    A block counts as tissue when at least half its pixels are (``stats``).
    """

    def __init__(self, scale: BlockScale, channel: int, width: int) -> None:
        self.scale, self.b, self.c0 = scale, scale.block_out, channel
        self.width = width // self.b
        self.rows = np.zeros((0, width, SCALE_CHANNELS), np.float32)
        self.tissue = np.zeros((0, width), np.float32)
        self.stats = WidthStats()

    def add(self, strip: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of a strip (h, W, channels) and its tissue mask (h, W) -> the block rows completed (maybe none)."""
        rows = np.concatenate([self.rows, strip[..., self.c0:self.c0 + SCALE_CHANNELS]])
        tis = np.concatenate([self.tissue, tissue.astype(np.float32)])
        b, nw = self.b, self.width
        n = rows.shape[0] // b
        self.rows, self.tissue = rows[n * b:].copy(), tis[n * b:].copy()
        means = rows[:n * b, :nw * b].reshape(n, b, nw, b, SCALE_CHANNELS).mean(axis=(1, 3))
        frac = tis[:n * b, :nw * b].reshape(n, b, nw, b).mean(axis=(1, 3))
        lo, hi = means[..., :3], means[..., 3:]
        width = (hi - lo).mean(axis=-1).astype(np.float32)
        self.stats.add(width, frac >= 0.5)
        return as_u8(lo), as_u8(hi), width[..., None]


def map_strips(strips: Iterator[np.ndarray], mask: SlideMask, stats: WidthStats,
               reference: ReferenceCoverage | None = None, blocks: list[BlockRows] | None = None
               ) -> Iterator[tuple[np.ndarray, ...]]:
    """Blended strips -> (lower, upper, mean uint8 RGB, width float32) and, per ``blocks`` entry, its block
    rows (lower, upper, width; possibly 0 rows), with stats."""
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
            extra = tuple(part for b in blocks or [] for part in b.add(s, tissue))
            yield (lower, upper, as_u8(s[..., 6:9]), width[..., None], *extra)
        strip = s = None  # drop the float32 rows before the blender fills the next region row


def _skip_empty(writer: Any) -> Any:
    """A pyramid writer that ignores 0-row strips (block maps get rows only every ``block`` image rows)."""

    def write(path: Path, strips: Iterator[np.ndarray], *args: Any, **kwargs: Any) -> Any:
        return writer(path, (s for s in strips if s.shape[0]), *args, **kwargs)

    return write


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


def scale_files(tag: str, fmt: str) -> dict[str, str]:
    """The block maps of one --scale (``tag`` e.g. "4um"): lower, upper (RGB uint8) and width (float32)."""
    suffix = SUFFIX[fmt]
    return {"lower": f"lower.{tag}{suffix}", "upper": f"upper.{tag}{suffix}",
            "width_float": f"width.{tag}.float32{suffix}"}


def _map_text(scale: ScaleChoice, q: float | None, source: str = "samples") -> str:
    centre = "the midpoint" if source == "bounds" else "the median"
    form = f"around {centre}" if scale.interval == "centered" else "as [l / lambda, u * lambda] on [0, 1]"
    what = "the interval run's bound" if source == "bounds" else f"quantile {q}"
    return f"{what} scaled by lambda {scale.lam} ({scale.interval}: {form}), then the fade to glass"




# ----------------------------------------------------------------------------- the op


class MapsOp:
    """The ``uncertainty`` region op: a region's interval -> 10 map channels (+ 6 per --scale); a folder of maps.

    A diffusion run is sampled N times per region (``RegionMaps``), an interval run
    called once per window (``RegionBounds``). ``calibration``: the calibration file
    (None: ``RUN/calibration.json`` if present, else lambda = 1); ``reference``: the
    real H&E of the same slide, whose coverage by the written bounds is measured;
    ``scales``: structure scales (µm) whose block-mean maps are written too, each
    with its lambda from the calibration (InputError in one line when not calibrated).
    """

    channels = CHANNELS
    nothing_to_do = "nothing to measure"

    def __init__(self, calibration: str | Path | None = None, reference: str | Path | None = None,
                 scales: tuple[float, ...] = ()) -> None:
        self.calibration = None if calibration is None else Path(calibration)
        self.reference = None if reference is None else Path(reference)
        if self.reference is not None and not self.reference.is_file():
            raise InputError("reference H&E slide not found (--reference)", self.reference)
        self.scale = ScaleChoice()
        self.scales_um = tuple(scales)
        self.blocks: list[BlockScale] = []
        self.source = "samples"
        self.sampler: RegionSampler | None = None
        self.maps: RegionMaps | RegionBounds | None = None

    def accept(self, run: Run) -> None:
        if run.kind == INTERVAL_KIND:
            self.source = "bounds"
        else:
            require_diffusion(run)
        self.scale = resolve_calibration(run, self.calibration)
        check_source(self.scale, self.source, run)
        self.blocks = resolve_block_scales(self.scale, self.scales_um, run)

    def inputs(self) -> list[Path]:
        return [p for p in (self.calibration, self.reference) if p is not None]

    def calibrated_sampling(self, run: Run) -> dict[str, Any] | None:
        return self.scale.made if self.scale.path is not None and self.source == "samples" else None

    def _place_blocks(self, ctx: SlideRun) -> None:
        """Each --scale's block on the output grid (the slide's own: ``block_px`` model px x the resampling)."""
        h, w = ctx.out_size
        for b in self.blocks:
            b.block_out = max(1, int(round(b.block_px * ctx.scale.factor)))
            if b.block_out > min(h, w):
                raise InputError(f"--scale {b.um:g} µm blocks are {b.block_out} px, more than the slide's "
                                 f"{w}x{h} px", ctx.af_path)

    def prepare(self, ctx: SlideRun) -> int:
        self._place_blocks(ctx)
        self.channels = CHANNELS + SCALE_CHANNELS * len(self.blocks)
        main = place().is_main
        if main:
            for message in calibration_warnings(self.scale, ctx.run):
                ctx.progress.warn(message)
        if self.source == "bounds":
            if ctx.options.samples is not None and main:
                ctx.progress.warn(f"--samples {ctx.options.samples} ignored: an interval run gives its bounds in "
                                  "one network call per window, without samples")
            ctx.options.samples = None
            self.sampler = RegionSampler(ctx.run, ctx.slide, ctx.mask, ctx.options)
            self.maps = RegionBounds(self.sampler, self.scale, self.blocks)
            return 1
        samples = ctx.options.samples or self.scale.samples or DEFAULT_SAMPLES
        ctx.options.samples = samples
        mismatch = calibration_mismatch(self.scale, ctx.sampling, samples)
        if mismatch:
            raise InputError(mismatch)
        self.sampler = _CachingSampler(ctx.run, ctx.slide, ctx.mask, ctx.options)
        self.maps = RegionMaps(self.sampler, samples, self.scale, ctx.progress, self.blocks)
        return ctx.sampling["steps"] * samples

    def __call__(self, region: stitch.Region) -> np.ndarray:
        return self.maps(region)

    def finish(self, strips: Iterator[np.ndarray], ctx: SlideRun, target: FolderOutput) -> UncertaintyResult:
        ref = None
        if self.reference is not None:
            ref = ReferenceCoverage(open_reference(self.reference, *ctx.out_size), self.reference)
        try:
            with target.publish() as tmp:
                levels, summary, vmax, checked, scales = self._write(tmp, strips, ctx, ref)
        finally:
            if ref is not None:
                ref.reader.close()
        o = ctx.options
        files = {k: target.path / v for k, v in output_files(o.out_format or "tiff").items()}
        for entry in scales:
            entry["files"] = {k: str(target.path / v) for k, v in entry["files"].items()}
        return UncertaintyResult(target.path, files, self.scale.lam, self.scale.path, levels, summary, vmax, 0.0,
                                 self.sampler.stats, o.samples, self.scale.interval, ctx.sampling or {}, checked,
                                 ctx.scale.as_dict(), self.source, scales)

    def _write(self, tmp: Path, strips: Iterator[np.ndarray], ctx: SlideRun, reference: ReferenceCoverage | None
               ) -> tuple[list[tuple[int, int]], dict[str, Any], float, dict[str, Any] | None, list[dict[str, Any]]]:
        """Both passes into the temp folder: maps, block maps + float width, then heat map, PNG and JSON."""
        options, run, scale, sampling = ctx.options, ctx.run, self.scale, ctx.sampling or {}
        bounds = self.source == "bounds"
        fmt = options.out_format or "tiff"
        files = output_files(fmt)
        H, W = ctx.out_size
        out_mpp = ctx.scale.out_mpp
        config = {
            "uncertainty": asdict(options), "steps_effective": sampling.get("steps"), "sampling": ctx.sampling,
            "model": str(run.path), "model_kind": run.kind, "model_step": run.step,
            "window_overlap": self.sampler.overlap, "source": self.source,
            "lam": scale.lam, "interval": scale.interval, "q_low": scale.q_low, "q_high": scale.q_high,
            "calibration": None if scale.path is None else str(scale.path),
            "reference": None if reference is None else str(reference.path),
            "sample_seeds": None if bounds else f"noise seed {options.seed} + {SAMPLE_STRIDE} k for sample k",
            "scale": ctx.scale.as_dict(),
            "structure_scales": [{"scale_um": b.um, "block_px": b.block_px, "block_px_out": b.block_out,
                                  "lam": b.cal.lam} for b in self.blocks],
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
        mean_text = "midpoint of the interval run's bounds" if bounds else f"mean of {options.samples} samples"
        specs = [
            dict(path=tmp / files["lower"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": f"lower bound, {_map_text(scale, scale.q_low, self.source)}"}, **common),
            dict(path=tmp / files["upper"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": f"upper bound, {_map_text(scale, scale.q_high, self.source)}"}, **common),
            dict(path=tmp / files["mean"], samples=3, dtype=np.uint8,
                 metadata={**meta, "map": mean_text}, **common),
            dict(path=tmp / files["width_float"], samples=1, dtype=np.float32,
                 metadata={**meta, "map": "interval width upper - lower, mean over RGB, 0-255 units"}, **common),
        ]
        rows = [BlockRows(b, CHANNELS + SCALE_CHANNELS * k, W) for k, b in enumerate(self.blocks)]
        for b in self.blocks:
            names = scale_files(b.tag, fmt)
            what = (f"{b.um:g} µm scale: {b.block_out} x {b.block_out} px block means of the "
                    f"{'bounds' if bounds else 'samples'}, lambda {b.cal.lam} ({b.cal.interval}), then the fade")
            block = dict(height=H // b.block_out, width=W // b.block_out,
                         mpp=None if out_mpp is None else out_mpp * b.block_out, compression=options.compression,
                         min_level_size=MIN_LEVEL_SIZE, writer=_skip_empty(writer))
            specs += [
                dict(path=tmp / names["lower"], samples=3, dtype=np.uint8,
                     metadata={**meta, "map": f"lower bound of {what}"}, **block),
                dict(path=tmp / names["upper"], samples=3, dtype=np.uint8,
                     metadata={**meta, "map": f"upper bound of {what}"}, **block),
                dict(path=tmp / names["width_float"], samples=1, dtype=np.float32,
                     metadata={**meta, "map": f"interval width of {what}, mean over RGB, 0-255 units"}, **block),
            ]
        stats = WidthStats()
        mask = mask_on_slide_grid(ctx.mask, ctx.slide)
        write_pyramids(specs, map_strips(strips, mask, stats, reference, rows), queue_size=1)
        summary = stats.summary()
        scales = [{"scale_um": r.scale.um, "block_px": r.scale.block_px, "block_um": r.scale.block_um,
                   "block_px_out": r.b, "mpp": None if out_mpp is None else out_mpp * r.b,
                   "size": [W // r.b, H // r.b], "lam": r.scale.cal.lam, "interval": r.scale.cal.interval,
                   "source": r.scale.cal.source, "risk_unit": r.scale.cal.risk_unit,
                   "files": scale_files(r.scale.tag, fmt),
                   "summary": {**r.stats.summary(), "tissue_blocks": r.stats.summary()["tissue_pixels"],
                               "unit": "0-255 RGB units, mean over channels of upper - lower of a block mean; "
                                       "tissue: blocks at least half tissue"}}
                  for r in rows]
        for entry in scales:
            entry["summary"].pop("tissue_pixels")
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
            "format": "vstain-uncertainty", "format_version": 3, **meta,
            "source": self.source, "network_calls_per_window": 1 if bounds else None,
            "lam": scale.lam, "interval": scale.interval, "calibration": config["calibration"],
            "samples": options.samples, "protocol": sampling.get("protocol"), "sampler": sampling.get("sampler"),
            "steps": sampling.get("steps"), "eta": sampling.get("eta"), "seed": options.seed,
            "levels": [list(s) for s in levels], "mpp": out_mpp, "summary": summary, "heatmap": scale_meta,
            "reference_check": checked,
            "files": {k: v for k, v in files.items() if k != "json"},
            "scales": scales,
            "regions": len(ctx.plan),
        })
        return levels, summary, vmax, checked, scales
