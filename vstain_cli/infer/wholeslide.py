"""Whole-slide machinery shared by ``stain`` and ``uncertainty``.

Open a run and an AF slide that fit each other, plan streaming regions, sample
each region with joint window denoising (``RegionSampler``), compute regions
here or across torchrun ranks (``region_stream``) and feather-blend them into
finished strips of rows (``blended_strips``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from vstain_cli.diffusion.samplers import SAMPLERS, sample
from vstain_cli.errors import InputError
from vstain_cli.infer import stitch
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.slides import TiffSlide, open_af
from vstain_cli.progress import Progress
from vstain_cli.provenance import atomic_output
from vstain_cli.runtime import place
from vstain_cli.seeding import sample_seed


@dataclass
class SlideOptions:
    """How a slide is sampled (shared by stain and uncertainty); recorded in the output's provenance."""

    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    batch_size: int = 16
    overlap: int | None = None      # window overlap in px (default: 1/4 window diffusion, 1/2 others)
    region: int = 1024              # streaming region size in px
    margin: int | None = None       # context around each region (default: half a window)
    seed: int = 0
    device: str = "auto"
    min_tissue: float = 0.0         # windows with tissue fraction <= this are skipped
    compression: str = "jpeg"
    quality: int = 90

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.steps is not None and not 1 <= self.steps <= 10_000:
            raise ValueError(f"--steps must be between 1 and 10000, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.region < 64:
            raise ValueError("--region must be at least 64 px")


@dataclass
class RegionStats:
    """Counters for the overhead benchmark."""

    regions: int = 0
    regions_background: int = 0
    windows: int = 0
    net_seconds: float = 0.0
    sample_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class RegionSampler:
    """Turns a region of an AF slide into RGB (0-255 float) with a trained run."""

    def __init__(self, run: Run, slide: TiffSlide, mask: SlideMask, options: SlideOptions):
        self.run, self.slide, self.mask, self.o = run, slide, mask, options
        self.window = run.tile_size
        # joint denoising hides seams with a quarter-window overlap; a deterministic
        # network is run once, so a half-window feather costs little and hides its
        # border effects (zero padding) better
        default = self.window // 4 if run.is_diffusion else self.window // 2
        self.overlap = options.overlap if options.overlap is not None else default
        self.stats = RegionStats()
        self.progress: Progress | None = None  # set to report sampler steps within each region

    def _step_callback(self, region: stitch.Region) -> Callable[[int, int, torch.Tensor], None] | None:
        """Advance a "steps" bar per sampler step (a region can take minutes on a CPU)."""
        progress = self.progress
        if progress is None:
            return None

        def callback(i: int, n: int, x: torch.Tensor) -> None:
            if i == 0:
                progress.start("steps", f"region {region.index + 1}: sampler steps", n)
            progress.advance("steps")

        return callback

    def condition(self, region: stitch.Region) -> torch.Tensor:
        y0, y1, x0, x1 = region.outer
        af = self.slide.read_region(x0, y0, x1 - x0, y1 - y0).transpose(2, 0, 1)
        return self.run.condition(torch.from_numpy(self.run.normalize(af))[None])

    def __call__(self, region: stitch.Region, sample_index: int = 0) -> np.ndarray:
        """(outer h, outer w, 3) float32 RGB 0-255 for one region (one sample)."""
        y0, y1, x0, x1 = region.outer
        h, w = y1 - y0, x1 - x0
        m = self.mask.box(y0, y1, x0, x1)
        self.stats.regions += 1
        if not m.any():
            self.stats.regions_background += 1
            return np.full((h, w, 3), 255.0, np.float32)
        cond = self.condition(region)
        dev = self.run.device
        t0 = time.perf_counter()
        if self.run.is_diffusion:
            seed = sample_seed(self.o.seed, sample_index)
            x_T = torch.from_numpy(stitch.noise_canvas(seed, y0, x0, h, w))[None].to(dev)
            fill = stitch.constant_fill(1.0, torch.as_tensor(self.run.schedule.alphas_cumprod), self.run.prediction)
            model = stitch.CanvasDenoiser(self.run.model, self.window, self.overlap, self.o.batch_size,
                                          mask=m, min_tissue=self.o.min_tissue, fill=fill)
            gen = stitch.region_generator(seed, region.index, "cpu" if dev.type != "cuda" else dev)
            x0_pred = sample(self.run.canvas_denoiser(model), x_T, self.run.schedule, cond, sampler=self.o.sampler,
                             steps=self.o.steps, eta=self.o.eta, generator=gen,
                             callback=self._step_callback(region))
            covered = torch.from_numpy(model.coverage_mask(h, w))
            self.stats.windows += model.windows_evaluated
            self.stats.net_seconds += model.net_seconds
        else:
            model = self.run.model
            fusion_mask = m
            x0_pred = stitch.blend_predictions(lambda c: model(c).float(), cond, self.window, self.overlap,
                                               self.o.batch_size, mask=fusion_mask)
            covered = torch.ones((h, w), dtype=torch.bool)
        self.stats.sample_seconds += time.perf_counter() - t0
        rgb = ((x0_pred[0].float().clamp(-1, 1) + 1.0) * 127.5).permute(1, 2, 0).cpu().numpy()
        rgb[~covered.numpy()] = 255.0
        soft = self.mask.soft_box(y0, y1, x0, x1)[..., None]
        return rgb * soft + 255.0 * (1.0 - soft)  # glass is white; the section's edge fades into it


def _distributed_regions(
    plan: list[stitch.Region], compute: Callable[[stitch.Region], np.ndarray], shard_dir: Path, progress: Progress
) -> Iterator[tuple[stitch.Region, np.ndarray]]:
    """Regions computed round-robin by every rank into ``shard_dir``; rank 0 yields them in order."""
    import torch.distributed as dist

    p = place()
    rank, world = p.rank, p.world_size
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    mine = [r for r in plan if r.index % world == rank]
    progress.start("regions", f"regions (rank {rank}/{world})", len(mine))
    for r in mine:
        np.save(shard_dir / f"region-{r.index:06d}.npy", compute(r))
        progress.advance("regions")
    dist.barrier()
    if rank == 0:
        for r in plan:
            path = shard_dir / f"region-{r.index:06d}.npy"
            yield r, np.load(path)
            path.unlink()
    dist.barrier()


def blended_strips(
    plan: list[stitch.Region], regions: Iterator[tuple[stitch.Region, np.ndarray]],
    height: int, width: int, channels: int, strip_rows: int,
) -> Iterator[np.ndarray]:
    """Feather-blend regions (in plan order) into finished strips of rows."""
    blender = stitch.RegionBlender(height, width, channels, plan, strip_rows)
    for region, pixels in regions:
        for _, strip in blender.add(region, pixels):
            yield strip
    for _, strip in blender.close():
        yield strip


def region_stream(
    plan: list[stitch.Region], compute: Callable[[stitch.Region], np.ndarray], out: Path, progress: Progress
) -> Iterator[tuple[stitch.Region, np.ndarray]]:
    """(region, pixels) in plan order: computed here, or across torchrun ranks."""
    p = place()
    rank, world = p.rank, p.world_size
    if world > 1:
        shard_dir = out.with_name(f".{out.name}.shards")
        if rank == 0:
            shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        try:
            yield from _distributed_regions(plan, compute, shard_dir, progress)
        finally:
            if rank == 0:
                shutil.rmtree(shard_dir, ignore_errors=True)
        return
    progress.start("regions", "regions", len(plan))
    for r in plan:
        pixels = compute(r)
        progress.advance("regions")
        yield r, pixels
    progress.finish("regions")


def open_for_inference(af_path: str | Path, model: str | Path | Run, device: str) -> tuple[Run, TiffSlide]:
    """Load the run and open the AF slide; check they fit each other."""
    run = resolve_run(model, device)
    if run.kind == "stainnet":
        raise InputError("is a StainNet run (a classifier); choose a diffusion, regression or pix2pix run", run.path)
    slide = open_af(af_path)
    if slide.channels != run.channels:
        slide.close()
        raise InputError(
            f"AF has {slide.channels} channels but model {run.path.name} was trained on {run.channels}", af_path
        )
    return run, slide


def make_plan(slide: TiffSlide, run: Run, options: SlideOptions) -> list[stitch.Region]:
    """The streaming region plan for a slide."""
    margin = options.margin if options.margin is not None else run.tile_size // 2
    return stitch.region_plan(slide.height, slide.width, options.region, margin, run.tile_size)


def write_thumbnail_png(tiff_path: Path, png_path: Path, max_size: int = 1024) -> Path:
    """A PNG of the smallest pyramid level that is >= max_size (atomic)."""
    from PIL import Image

    with TiffSlide(tiff_path) as t:
        thumb, _ = t.thumbnail(max_size)
    img = thumb[..., :3] if thumb.shape[2] >= 3 else np.repeat(thumb, 3, axis=2)
    with atomic_output(png_path) as tmp:
        Image.fromarray(np.ascontiguousarray(img.astype(np.uint8))).save(tmp, format="PNG")
    return png_path


def require_diffusion(run: Run) -> None:
    """InputError unless ``run`` samples: regression and pix2pix give one output per input."""
    if run.kind == "stainnet":
        raise InputError("is a StainNet run (a classifier); choose a diffusion run", run.path)
    if not run.is_diffusion:
        raise InputError(f"is a {run.kind} run: it is deterministic (one output per input), so there is "
                         "no sample spread to measure; use a diffusion run", run.path)
