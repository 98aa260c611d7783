"""The one whole-slide engine: AF slide + run + region op -> an output, streamed.

``run_slide(af, model, op, target, options, progress)`` is the only whole-slide
loop of vstain (``stain`` and ``uncertainty`` are short compositions of it):

1. open the AF slide and resolve the run once, and check that they fit;
2. check the output (``io/outputs.SlideOutput``) before any heavy work;
3. the sampling (``--protocol``, ``--sampler``/``--steps``/``--eta``, else the
   run's calibration, else DDIM-50), the scale fit (``io/resample``), the tissue
   mask and the region plan (``stitch.region_plan``); the plan and an ETA are
   reported before the first region;
4. every region through the op, here or split round-robin across torchrun ranks
   (rank from ``runtime.place``; rank 0 blends and writes);
5. regions feather-blended into finished strips (``stitch.blend_regions``),
   brought to the slide's own grid and handed to the op, which writes them to
   the target.

A ``RegionOp`` decides what a region becomes (RGB, interval maps...) and how it
calls the run (one sample, N samples, one pass of an interval model); a
``SlideOutput`` decides where and how the result is published. A new command is
one op class, a new output kind one output class (docs/architecture.md, recipes).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from vstain_cli.diffusion.samplers import SAMPLERS, protocol_label, protocol_record, resolve_protocol
from vstain_cli.errors import InputError, input_errors
from vstain_cli.infer import stitch
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.infer.wholeslide import DEFAULT_SAMPLER, RegionSampler, SlideOptions, calibrated_sampling, fit_scale
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.outputs import SlideOutput
from vstain_cli.io.resample import SlideScale, output_size, to_slide_grid
from vstain_cli.io.slide_base import check_readable
from vstain_cli.io.slides import TiffSlide, open_af
from vstain_cli.progress import NullProgress, Progress, info
from vstain_cli.runtime import place


@dataclass
class SlideRun:
    """What the engine resolved for one slide; handed to the op (``prepare``, ``finish``)."""

    af_path: Path
    run: Run
    slide: TiffSlide                      # at the model's scale (``io/resample``)
    mask: SlideMask
    scale: SlideScale
    plan: list[stitch.Region]
    options: Any                          # the op's options, with the sampling resolved
    sampling: dict[str, Any] | None       # protocol record (None: a one-pass model)
    progress: Progress
    t0: float = field(default_factory=time.perf_counter)

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of the outputs: the slide's own grid."""
        return output_size(self.slide)

    def strips(self, regions: Iterator[tuple[stitch.Region, np.ndarray]], channels: int) -> Iterator[np.ndarray]:
        """The blended regions as strips of rows on the slide's own grid (float32)."""
        blended = (s for _, s in stitch.blend_regions(self.plan, regions, self.slide.height, self.slide.width,
                                                      channels))
        return iter(to_slide_grid(blended, self.slide))


class RegionOp(Protocol):
    """What a whole-slide command does with each region, and what it writes at the end.

    ``channels``: channels of ``__call__``'s output. The engine calls, in order:
    ``accept(run)`` (InputError if the op cannot use the run), ``inputs()``
    (extra input files the output must not overwrite), ``calibrated_sampling(run)``
    (the sampler/steps/eta the op's calibration was made with, or None),
    ``prepare(ctx)`` (once the slide, mask and plan are known: build the sampler,
    check settings, warn; returns the network evaluations per window for the ETA),
    ``__call__(region)`` per region (on every torchrun rank), then on rank 0
    ``finish(strips, ctx, target)`` with the blended strips ((h, W, channels)
    float32 rows, top to bottom, on the slide's own grid), which writes the
    target and returns the command's result. How the run is called (one sample,
    N samples, one pass of a model that outputs bounds) is the op's own business.
    """

    channels: int
    nothing_to_do: str        # the message when the slide has no tissue
    sampler: RegionSampler    # set by ``prepare``: the window size, overlap and timing of the plan line

    def accept(self, run: Run) -> None: ...

    def inputs(self) -> list[Path]: ...

    def calibrated_sampling(self, run: Run) -> dict[str, Any] | None: ...

    def prepare(self, ctx: SlideRun) -> int: ...

    def __call__(self, region: stitch.Region) -> np.ndarray: ...

    def finish(self, strips: Iterator[np.ndarray], ctx: SlideRun, target: SlideOutput) -> Any: ...


# ----------------------------------------------------------------------------- resolving the run


def open_for_inference(af_path: str | Path, model: str | Path | Run, device: str) -> tuple[Run, TiffSlide]:
    """Open the AF slide (named first when missing), load the run; check they fit each other.

    The slide is opened knowing the run's channel count, so an RGB H&E given as AF is
    refused with what the model expects."""
    check_readable(Path(af_path))
    run = resolve_run(model, device)
    slide = open_af(af_path, model_channels=run.channels)
    try:
        if run.kind == "stainnet":
            raise InputError("is a StainNet run (a classifier); choose a diffusion, regression or pix2pix run",
                             run.path)
        if slide.channels != run.channels:
            raise InputError(
                f"AF has {slide.channels} channels but model {run.path.name} was trained on {run.channels}", af_path
            )
    except BaseException:
        slide.close()
        raise
    return run, slide


def resolve_sampling(options: Any, run: Run, calibrated: dict[str, Any] | None) -> tuple[Any, dict | None, str]:
    """``options`` with sampler, steps and eta filled in, the protocol record and where they came from.

    The flags win; with none of --sampler/--steps/--eta given, the calibration's
    settings (``calibrated``) are the default, so its lambda holds; else DDIM with
    its default steps, eta 0. ``--protocol paper`` runs DDPM over T steps.
    """
    source = "flags"
    sampler, steps, eta = options.sampler, options.steps, options.eta
    if (options.protocol == "fast" and sampler is None and steps is None and eta is None and calibrated
            and calibrated.get("sampler") in SAMPLERS):
        sampler, steps, eta = calibrated["sampler"], calibrated.get("steps"), calibrated.get("eta")
        source = "calibration"
    elif sampler is None and steps is None and eta is None:
        source = "default"
    sampler, eta = sampler or DEFAULT_SAMPLER, 0.0 if eta is None else float(eta)
    with input_errors():
        sampler, steps, eta = resolve_protocol(options.protocol, sampler, steps, eta)
    resolved = replace(options, sampler=sampler, steps=steps, eta=eta)
    if not run.is_diffusion:
        return resolved, None, source
    record = protocol_record(options.protocol, sampler, steps, eta, run.schedule.T)
    if record["steps"] > run.schedule.T:
        raise InputError(f"--steps {record['steps']} exceeds the model's T = {run.schedule.T} steps", run.path)
    return resolved, record, source


def make_plan(slide: TiffSlide, run: Run, options: SlideOptions) -> list[stitch.Region]:
    """The streaming region plan for a slide."""
    margin = options.margin if options.margin is not None else run.tile_size // 2
    return stitch.region_plan(slide.height, slide.width, options.region, margin, run.tile_size)


def plan_windows(plan: list[stitch.Region], mask: SlideMask, window: int, overlap: int) -> tuple[int, int]:
    """(regions with tissue, windows the network sees at most in them)."""
    regions = windows = 0
    for r in plan:
        y0, y1, x0, x1 = r.outer
        if mask.box(y0, y1, x0, x1).any():
            regions += 1
            windows += len(stitch.window_grid(y1 - y0, x1 - x0, window, overlap))
    return regions, windows


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plan_line(ctx: SlideRun, sampler: RegionSampler, evaluations: int, source: str) -> str:
    """One line: the size, the regions and windows, how it samples, and an ETA from a timed network call."""
    tissue, windows = plan_windows(ctx.plan, ctx.mask, sampler.window, sampler.overlap)
    h, w = ctx.out_size
    how = "one pass" if ctx.sampling is None else protocol_label(ctx.sampling)
    if ctx.sampling is not None and source != "flags":
        how += f" ({'from the run calibration' if source == 'calibration' else 'default'})"
    per_window = sampler.seconds_per_window()
    eta = windows * evaluations * per_window
    return (f"plan: {w}x{h} px, {len(ctx.plan)} regions ({tissue} with tissue), up to {windows} windows of "
            f"{sampler.window} px, {how}, {evaluations} network evaluations per window; ETA ~{_clock(eta)} "
            f"({per_window * 1e3:.3g} ms per window on {ctx.run.device})")


# ----------------------------------------------------------------------------- the region loop


def _distributed_regions(
    plan: list[stitch.Region], compute: Callable[[stitch.Region], np.ndarray], shard_dir: Path, progress: Progress
) -> Iterator[tuple[stitch.Region, np.ndarray]]:
    """Regions computed round-robin by every rank into ``shard_dir``; rank 0 yields them in order."""
    import torch.distributed as dist

    p = place()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    mine = [r for r in plan if r.index % p.world_size == p.rank]
    progress.start("regions", f"regions (rank {p.rank}/{p.world_size})", len(mine))
    for r in mine:
        np.save(shard_dir / f"region-{r.index:06d}.npy", compute(r))
        progress.advance("regions")
    dist.barrier()
    if p.is_main:
        for r in plan:
            path = shard_dir / f"region-{r.index:06d}.npy"
            yield r, np.load(path)
            path.unlink()
    dist.barrier()


def computed_regions(
    plan: list[stitch.Region], compute: Callable[[stitch.Region], np.ndarray], out: Path, progress: Progress
) -> Iterator[tuple[stitch.Region, np.ndarray]]:
    """(region, pixels) in plan order: computed here, or across torchrun ranks (shards next to ``out``)."""
    p = place()
    if p.distributed:
        shard_dir = out.with_name(f".{out.name}.shards")
        if p.is_main:
            shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        try:
            yield from _distributed_regions(plan, compute, shard_dir, progress)
        finally:
            if p.is_main:
                shutil.rmtree(shard_dir, ignore_errors=True)
        return
    progress.start("regions", "regions", len(plan))
    for r in plan:
        pixels = compute(r)
        progress.advance("regions")
        yield r, pixels
    progress.finish("regions")


def run_slide(af: str | Path, model: str | Path | Run, op: RegionOp, target: SlideOutput,
              options: SlideOptions, progress: Progress | None = None) -> Any:
    """Run ``op`` over every region of the AF slide ``af`` and write ``target``; ``op.finish``'s result.

    None on torchrun ranks > 0 (they compute their share of the regions; rank 0 writes).
    Errors: InputError (one line naming the file) for unusable inputs, OutputExistsError
    when the target exists without ``--force``; nothing is left behind on any error.
    """
    progress = progress or NullProgress()
    with input_errors():
        options.check()
    af_path = Path(af)
    main = place().is_main
    t0 = time.perf_counter()
    run, slide = open_for_inference(af_path, model, options.device)  # inputs first, then the output
    try:
        op.accept(run)
        if main:
            target.check(inputs=[af_path, run.path, *op.inputs()])
        options, sampling, source = resolve_sampling(options, run, op.calibrated_sampling(run))
        slide, scale = fit_scale(run, slide, options)  # the model's µm/px; outputs at the slide's
        mask = SlideMask(slide, run.tile_size)
        if mask.empty:
            raise InputError(f"no tissue found in the AF slide ({op.nothing_to_do})", af_path)
        for message in scale.warnings if main else []:  # once the inputs are known to be usable
            progress.warn(message)
        ctx = SlideRun(af_path, run, slide, mask, scale, make_plan(slide, run, options), options, sampling,
                       progress, t0)
        evaluations = op.prepare(ctx)
        if main:
            info(progress, plan_line(ctx, op.sampler, evaluations, source))
        regions = computed_regions(ctx.plan, op, target.path, progress)
        if not main:
            for _ in regions:
                pass
            return None
        return op.finish(ctx.strips(regions, op.channels), ctx, target)
    finally:
        slide.close()


__all__ = ["RegionOp", "SlideOptions", "SlideRun", "calibrated_sampling", "computed_regions", "make_plan",
           "open_for_inference", "plan_line", "resolve_sampling", "run_slide"]
