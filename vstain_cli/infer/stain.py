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
from typing import Any, Iterator

import numpy as np

from vstain_cli.infer import stitch
from vstain_cli.infer.engine import SlideRun, run_slide
from vstain_cli.infer.run import Run
from vstain_cli.infer.wholeslide import (
    RegionSampler,
    RegionStats,
    SlideOptions,
    calibrated_sampling,
    write_thumbnail_png,
)
from vstain_cli.io.outputs import FileOutput
from vstain_cli.progress import Progress
from vstain_cli.provenance import fingerprint, record
from vstain_cli.train.run_folder import CONFIG

THUMBNAIL_SIZE = 1024


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


class StainOp:
    """The ``stain`` region op: one sample per region, faded into white glass; an RGB image + thumbnail."""

    channels = 3
    nothing_to_do = "nothing to stain"

    def __init__(self) -> None:
        self.sampler: RegionSampler | None = None

    def accept(self, run: Run) -> None:
        """Any run that stains (StainNet runs are refused by the engine)."""

    def inputs(self) -> list[Path]:
        return []

    def calibrated_sampling(self, run: Run) -> dict[str, Any] | None:
        return calibrated_sampling(run)

    def prepare(self, ctx: SlideRun) -> int:
        self.sampler = RegionSampler(ctx.run, ctx.slide, ctx.mask, ctx.options)
        self.sampler.progress = ctx.progress
        return ctx.sampling["steps"] if ctx.sampling else 1

    def __call__(self, region: stitch.Region) -> np.ndarray:
        return self.sampler(region)

    def finish(self, strips: Iterator[np.ndarray], ctx: SlideRun, target: FileOutput) -> StainResult:
        o, run = ctx.options, ctx.run
        meta = record({"stain": {**asdict(o), "out_format": target.format}, "model": str(run.path), "model_kind": run.kind,
                       "model_step": run.step, "window_overlap": self.sampler.overlap, "sampling": ctx.sampling,
                       "scale": ctx.scale.as_dict()},
                      {"af": fingerprint(ctx.af_path), "model_config": fingerprint(run.path / CONFIG)})
        u8 = (np.clip(np.rint(s), 0, 255).astype(np.uint8) for s in strips)
        H, W = ctx.out_size
        levels = target.write(u8, H, W, 3, np.uint8, mpp=ctx.scale.out_mpp, compression=o.compression,
                              quality=o.quality, metadata=meta, min_level_size=256)
        thumb = write_thumbnail_png(target.path, target.thumbnail, THUMBNAIL_SIZE)
        return StainResult(target.path, thumb, levels, 0.0, self.sampler.stats, ctx.sampling, ctx.scale.as_dict())


def stain_slide(
    af_path: str | Path,
    model: str | Path | Run,
    out: str | Path,
    options: StainOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> StainResult:
    """Virtually stain a whole AF slide into a pyramidal H&E TIFF or OME-Zarr image (+ PNG thumbnail).

    On torchrun ranks > 0 the result has no thumbnail and no levels (rank 0 writes).
    """
    options = options or StainOptions()
    t0 = time.perf_counter()
    op = StainOp()
    result = run_slide(af_path, model, op, FileOutput(out, force, options.out_format), options, progress)
    seconds = time.perf_counter() - t0
    if result is None:
        return StainResult(Path(out), None, [], seconds, op.sampler.stats if op.sampler else RegionStats())
    result.seconds = seconds
    return result
