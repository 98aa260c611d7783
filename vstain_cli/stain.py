"""Whole-slide virtual staining: AF slide -> stitched, pyramidal H&E TIFF.

grid -> batched sampling -> blend -> writer (DESIGN.md §2, §4):

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

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from vstain_cli import stitch
from vstain_cli.diffusion.samplers import SAMPLERS, sample
from vstain_cli.errors import InputError
from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.io.slides import TiffSlide, open_af
from vstain_cli.io.tiff import write_pyramid
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, check_output_file, fingerprint, record
from vstain_cli.runs import Run, load_run

MASK_PX_PER_WINDOW = 8


@dataclass
class StainOptions:
    """How a slide is stained; recorded in the output's provenance."""

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
            raise InputError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.steps is not None and not 1 <= self.steps <= 10_000:
            raise InputError(f"--steps must be between 1 and 10000, got {self.steps}")
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if self.region < 64:
            raise InputError("--region must be at least 64 px")


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a clear error for missing CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith(("cuda", "mps")):
        raise InputError(f"unknown --device {name!r} (cpu, cuda, cuda:N or auto)")
    return torch.device(name)


class SlideMask:
    """A tissue mask on an AF thumbnail, looked up at level-0 boxes."""

    def __init__(self, slide: TiffSlide, tile: int):
        target = max(64, int(np.ceil(max(slide.width, slide.height) * MASK_PX_PER_WINDOW / tile)))
        total, self.downsample = slide.thumbnail(target, channel_sum=True)
        full = float(np.iinfo(slide.dtype).max) if np.issubdtype(slide.dtype, np.integer) else 0.0
        self.mask = tissue_mask_af(total, full_scale=full, channels=slide.channels)
        self._soft: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The mask at level-0 resolution over a box (nearest neighbour)."""
        ys = np.minimum((np.arange(y0, y1) / self.downsample).astype(int), self.mask.shape[0] - 1)
        xs = np.minimum((np.arange(x0, x1) / self.downsample).astype(int), self.mask.shape[1] - 1)
        return self.mask[ys[:, None], xs[None, :]]

    def soft_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """A feathered tissue weight in [0, 1] over a box: 1 on tissue, 0 on glass.

        The thumbnail mask, dilated by one thumbnail pixel and blurred, is
        interpolated bilinearly to level 0, so the section's edge fades to white
        glass smoothly instead of following the window grid.
        """
        if self._soft is None:
            from scipy.ndimage import binary_dilation, gaussian_filter

            self._soft = gaussian_filter(binary_dilation(self.mask).astype(np.float32), 1.0)
        s = self._soft
        fy = np.clip((np.arange(y0, y1) + 0.5) / self.downsample - 0.5, 0, s.shape[0] - 1)
        fx = np.clip((np.arange(x0, x1) + 0.5) / self.downsample - 0.5, 0, s.shape[1] - 1)
        iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
        iy1, ix1 = np.minimum(iy + 1, s.shape[0] - 1), np.minimum(ix + 1, s.shape[1] - 1)
        wy, wx = (fy - iy)[:, None], (fx - ix)[None, :]
        top = s[iy][:, ix] * (1 - wx) + s[iy][:, ix1] * wx
        bottom = s[iy1][:, ix] * (1 - wx) + s[iy1][:, ix1] * wx
        return np.clip((top * (1 - wy) + bottom * wy - 0.1) / 0.5, 0.0, 1.0).astype(np.float32)


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

    def __init__(self, run: Run, slide: TiffSlide, mask: SlideMask, options: StainOptions):
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
            seed = self.o.seed + 1_000_003 * sample_index
            x_T = torch.from_numpy(stitch.noise_canvas(seed, y0, x0, h, w))[None].to(dev)
            fill = stitch.constant_fill(1.0, torch.as_tensor(self.run.schedule.alphas_cumprod), self.run.prediction)
            model = stitch.CanvasDenoiser(self.run.denoiser, self.window, self.overlap, self.o.batch_size,
                                          mask=m, min_tissue=self.o.min_tissue, fill=fill)
            gen = stitch.region_generator(seed, region.index, "cpu" if dev.type != "cuda" else dev)
            x0_pred = sample(model, x_T, self.run.schedule, cond, sampler=self.o.sampler, steps=self.o.steps,
                             prediction=self.run.prediction, eta=self.o.eta, generator=gen,
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


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _distributed_regions(
    plan: list[stitch.Region], compute: Callable[[stitch.Region], np.ndarray], shard_dir: Path, progress: Progress
) -> Iterator[tuple[stitch.Region, np.ndarray]]:
    """Regions computed round-robin by every rank into ``shard_dir``; rank 0 yields them in order."""
    import torch.distributed as dist

    rank, world = _rank_world()
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
    rank, world = _rank_world()
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


@dataclass
class StainResult:
    """What ``stain_slide`` wrote and measured."""

    out: Path
    thumbnail: Path | None
    levels: list[tuple[int, int]]
    seconds: float
    stats: RegionStats


def open_for_inference(af_path: str | Path, model: str | Path | Run, device: str) -> tuple[Run, TiffSlide]:
    """Load the run and open the AF slide; check they fit each other."""
    run = model if isinstance(model, Run) else load_run(model, pick_device(device))
    if run.kind == "stainnet":
        raise InputError("is a StainNet run (a classifier); choose a diffusion, regression or pix2pix run", run.path)
    slide = open_af(af_path)
    if slide.channels != run.channels:
        slide.close()
        raise InputError(
            f"AF has {slide.channels} channels but model {run.path.name} was trained on {run.channels}", af_path
        )
    return run, slide


def make_plan(slide: TiffSlide, run: Run, options: StainOptions) -> list[stitch.Region]:
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
    options.check()
    progress = progress or NullProgress()
    af_path, out = Path(af_path), Path(out)
    rank, _ = _rank_world()
    if rank == 0:
        check_output_file(out, force, inputs=[af_path])
    t0 = time.perf_counter()
    run, slide = open_for_inference(af_path, model, options.device)
    try:
        torch.manual_seed(options.seed)
        mask = SlideMask(slide, run.tile_size)
        if mask.empty:
            raise InputError("no tissue found in the AF slide (nothing to stain)", af_path)
        plan = make_plan(slide, run, options)
        sampler = RegionSampler(run, slide, mask, options)
        sampler.progress = progress
        regions = region_stream(plan, sampler, out, progress)
        if rank != 0:
            for _ in regions:
                pass
            return StainResult(out, None, [], time.perf_counter() - t0, sampler.stats)
        meta = record({"stain": asdict(options), "model": str(run.path), "model_kind": run.kind,
                       "model_step": run.step, "window_overlap": sampler.overlap},
                      {"af": fingerprint(af_path), "model_config": fingerprint(run.path / "config.json")})
        strips = (np.clip(np.rint(s), 0, 255).astype(np.uint8)
                  for s in blended_strips(plan, regions, slide.height, slide.width, 3, 256))
        levels = write_pyramid(out, strips, slide.height, slide.width, 3, np.uint8, mpp=slide.mpp,
                               compression=options.compression, quality=options.quality, metadata=meta,
                               min_level_size=256)
        thumb = write_thumbnail_png(out, out.with_suffix(".thumbnail.png"))
    finally:
        slide.close()
    return StainResult(out, thumb, levels, time.perf_counter() - t0, sampler.stats)

