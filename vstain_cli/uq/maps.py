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
(``maps_op.RegionMaps``). With ``reference`` (the real H&E of the same slide) the
written bounds are checked against it, strip by strip: the empirical coverage
and mean width over tissue go to uncertainty.json.

Streaming, through the same engine as ``stain`` (``infer/engine.run_slide`` with the
region op ``uq/maps_op.MapsOp``): the slide is cut into the same regions; in a
region, sample k is the region ``stain`` would write with sample index k (joint
MultiDiffusion denoising on the counter-based noise canvas of seed
``seed + 1_000_003 k``), so sample 0 is the ``stain`` output of the same seed.
Only the N samples of one region are held (N x region x 3 float32); the maps of
each region (lower, upper, mean RGB and the width, 10 channels) are feather-
blended with one ``RegionBlender`` and fanned out to the pyramid writers.

An interval run (``vstain distill --intervals``: lower and upper bounds in one
network call, Conffusion-style) makes the same maps without samples: its bounds
are feather-blended over the windows of each region like a regression output,
scaled by the lambda its own calibration (source "bounds") found around their
midpoint, and faded the same way; the mean map is the midpoint
(``maps_op.RegionBounds``). ``--samples`` does not apply (a warning says so).

Structure scales (``--scale UM``, docs/uncertainty.md §10): the interval of the
mean over UM x UM µm blocks (block means of the samples, or of the bounds), with
that scale's lambda from ``calibrate --scale``, written at block resolution
(``lower.UMum.tif``, ``upper.UMum.tif``, ``width.UMum.float32.tif``, mpp = the
block's size) with the width summary of each scale in uncertainty.json.

Outputs (a folder written under a temporary name and renamed when complete):
``lower.tif``, ``upper.tif``, ``mean.tif`` (RGB uint8 pyramids, lossless so
lower <= upper per pixel survives), ``width.tif`` (uint8 viridis heat map
pyramid, scale in its metadata), ``width.float32.tif`` (float32 width, mean over
RGB in 0-255 units, for analysis with tifffile), ``width.png`` (heat map over the
mean-stain thumbnail) and ``uncertainty.json`` (provenance and summary).
"""

from __future__ import annotations

import time
from pathlib import Path

from vstain_cli.infer.engine import run_slide
from vstain_cli.infer.run import Run
from vstain_cli.io.outputs import FolderOutput
from vstain_cli.progress import Progress
from vstain_cli.uq.heatmap import apply_heatmap, heatmap_lut, nice_ceiling, write_overlay_png
from vstain_cli.uq.maps_op import (
    DEFAULT_SAMPLES,
    FILES,
    BlockScale,
    MapsOp,
    ReferenceCoverage,
    RegionBounds,
    RegionMaps,
    ScaleChoice,
    UncertaintyOptions,
    UncertaintyResult,
    calibration_mismatch,
    calibration_warnings,
    output_files,
    resolve_calibration,
    scale_files,
)


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

    ``model``: a diffusion run (N samples per region) or an interval run (one network
    call per window). ``options.scales``: structure scales (µm) whose block-mean maps
    are written too; each must be calibrated (InputError naming the calibration file).

    ``reference``: the real H&E of the same slide (registered, same size); the
    coverage of its tissue pixels by the written bounds is measured and recorded.
    Without --sampler/--steps/--eta the calibration's settings are used; InputError
    when the calibration was made with another interval form, sampler, step count,
    eta or sample count than the maps would use.
    """
    options = options or UncertaintyOptions()
    t0 = time.perf_counter()
    op = MapsOp(calibration, reference, tuple(options.scales))
    target = FolderOutput(out, force, marker=FILES["json"])
    result = run_slide(af_path, model, op, target, options, progress)
    if result is not None:
        result.seconds = time.perf_counter() - t0
    return result


__all__ = ["DEFAULT_SAMPLES", "FILES", "BlockScale", "MapsOp", "ReferenceCoverage", "RegionBounds", "RegionMaps",
           "ScaleChoice", "scale_files",
           "UncertaintyOptions", "UncertaintyResult", "apply_heatmap", "calibration_mismatch",
           "calibration_warnings", "heatmap_lut", "nice_ceiling", "output_files", "resolve_calibration",
           "uncertainty_slide", "write_overlay_png"]
