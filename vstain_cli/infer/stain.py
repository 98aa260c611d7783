"""Whole-slide virtual staining: AF slide -> stitched, pyramidal H&E TIFF.

grid -> batched sampling -> blend -> writer:

1. a tissue mask from an AF thumbnail; background becomes white glass without
   model calls;
2. the slide is cut into streaming regions (``stitch.region_plan``); in each, a
   diffusion model denoises overlapping windows *jointly* — at every sampler
   step the window predictions are fused (MultiDiffusion) over one noise canvas
   that is a pure function of slide position (``stitch.noise_canvas``), so the
   result does not depend on the region plan's split of the work; regression
   and pix2pix outputs are feather-blended once;
3. regions are feather-blended where they meet (``stitch.RegionBlender``) and
   finished strips stream into the pyramid writer: memory is bounded by about
   two region rows x slide width whatever the slide size.

``torchrun --nproc-per-node=K -m vstain_cli stain ...`` splits the regions across
ranks; rank 0 blends and writes. Region results depend only on (seed, region),
so the slide is identical to a one-process run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstain_cli.errors import InputError, input_errors
from vstain_cli.infer.run import Run
from vstain_cli.infer.wholeslide import (
    RegionSampler,
    RegionStats,
    SlideOptions,
    apply_protocol,
    blended_strips,
    fit_scale,
    make_plan,
    open_for_inference,
    region_stream,
    write_thumbnail_png,
)
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.outputs import check_replaceable, writer_for
from vstain_cli.io.resample import output_size, to_slide_grid
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import check_output_file, fingerprint, record
from vstain_cli.runtime import place


@dataclass
class StainOptions(SlideOptions):
    """How a slide is stained; recorded in the output's provenance."""


@dataclass
class StainResult:
    """What ``stain_slide`` wrote and measured."""

    out: Path
    thumbnail: Path | None
    levels: list[tuple[int, int]]
    seconds: float
    stats: RegionStats
    sampling: dict[str, Any] | None = None   # protocol, sampler, steps, eta (None: a one-pass model)
    scale: dict[str, Any] | None = None      # the slide-scale decision (``SlideScale.as_dict``)


def stain_slide(
    af_path: str | Path,
    model: str | Path | Run,
    out: str | Path,
    options: StainOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> StainResult:
    """Virtually stain a whole AF slide into a pyramidal H&E TIFF (+ PNG thumbnail)."""
    options = options or StainOptions()
    with input_errors():
        options.check()
    progress = progress or NullProgress()
    af_path, out = Path(af_path), Path(out)
    rank = place().rank
    t0 = time.perf_counter()
    run, slide = open_for_inference(af_path, model, options.device)  # inputs first, then the output
    if rank == 0:
        try:
            check_output_file(out, force, inputs=[af_path])
            check_replaceable(out, options.out_format)
        except BaseException:
            slide.close()
            raise
    options, sampling = apply_protocol(options, run)
    try:
        slide, scale = fit_scale(run, slide, options)  # the model's µm/px; outputs at the slide's
        torch.manual_seed(options.seed)
        mask = SlideMask(slide, run.tile_size)
        if mask.empty:
            raise InputError("no tissue found in the AF slide (nothing to stain)", af_path)
        for message in scale.warnings if rank == 0 else []:  # once the inputs are known to be usable
            progress.warn(message)
        plan = make_plan(slide, run, options)
        sampler = RegionSampler(run, slide, mask, options)
        sampler.progress = progress
        regions = region_stream(plan, sampler, out, progress)
        if rank != 0:
            for _ in regions:
                pass
            return StainResult(out, None, [], time.perf_counter() - t0, sampler.stats)
        meta = record({"stain": asdict(options), "model": str(run.path), "model_kind": run.kind,
                       "model_step": run.step, "window_overlap": sampler.overlap, "sampling": sampling,
                       "scale": scale.as_dict()},
                      {"af": fingerprint(af_path), "model_config": fingerprint(run.path / "config.json")})
        blended = blended_strips(plan, regions, slide.height, slide.width, 3, 256)
        strips = (np.clip(np.rint(s), 0, 255).astype(np.uint8) for s in to_slide_grid(blended, slide))
        H, W = output_size(slide)
        levels = writer_for(options.out_format)(out, strips, H, W, 3, np.uint8, mpp=scale.out_mpp,
                                                compression=options.compression, quality=options.quality,
                                                metadata=meta, min_level_size=256)
        thumb = write_thumbnail_png(out, out.with_suffix(".thumbnail.png"))
    finally:
        slide.close()
    return StainResult(out, thumb, levels, time.perf_counter() - t0, sampler.stats, sampling,
                       scale.as_dict())

