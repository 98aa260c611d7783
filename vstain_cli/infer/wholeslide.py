"""What one region of a whole slide needs, for the ops of ``infer/engine``.

The sampling options (``SlideOptions``), a region sampled with joint window
denoising (``RegionSampler``), the slide brought to the run's scale
(``fit_scale``), the sampling a run was calibrated with (``calibrated_sampling``)
and the PNG previews (``write_thumbnail_png``, ``fit_within``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vstain_cli.diffusion.samplers import SAMPLERS, resolve_protocol, sample
from vstain_cli.errors import InputError, input_errors
from vstain_cli.infer import stitch
from vstain_cli.infer.run import Run
from vstain_cli.io.masks import SlideMask
from vstain_cli.io.outputs import OUTPUT_FORMATS
from vstain_cli.io.resample import ResampledSlide, SlideScale, plan_scale
from vstain_cli.io.slides import TiffSlide, open_image
from vstain_cli.progress import Progress
from vstain_cli.provenance import atomic_output
from vstain_cli.seeding import sample_seed
from vstain_cli.train.run_folder import CALIBRATION_FILE

DEFAULT_SAMPLER = "ddim"  # when neither the flags nor the run's calibration say


@dataclass
class SlideOptions:
    """How a slide is sampled (shared by stain and uncertainty); recorded in the output's provenance."""

    sampler: str | None = None      # None (with steps, eta): the run's calibration's, else DDIM
    steps: int | None = None
    eta: float | None = None
    protocol: str = "fast"          # "paper": DDPM with the model's T steps (samplers.PROTOCOLS)
    batch_size: int = 16
    overlap: int | None = None      # window overlap in px (default: 1/4 window diffusion, 1/2 others)
    region: int = 1024              # streaming region size in px
    margin: int | None = None       # context around each region (default: half a window)
    seed: int = 0
    device: str = "auto"
    min_tissue: float = 0.0         # windows with tissue fraction <= this are skipped
    compression: str = "jpeg"
    quality: int = 90
    mpp: float | None = None        # the slide's µm/px when its file lacks or misstates it (--mpp)
    out_format: str | None = None   # "tiff" or "zarr" (--format); None: from the output's suffix

    def check(self) -> None:
        """ValueError naming the flag for a value no run can use."""
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        # ValueError on a conflicting flag
        resolve_protocol(self.protocol, self.sampler or DEFAULT_SAMPLER, self.steps, self.eta or 0.0)
        if self.steps is not None and not 1 <= self.steps <= 10_000:
            raise ValueError(f"--steps must be between 1 and 10000, got {self.steps}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"--eta must be between 0 and 1, got {self.eta}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.region < 64:
            raise ValueError("--region must be at least 64 px")
        if self.out_format is not None and self.out_format not in OUTPUT_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.out_format!r}")
        if self.mpp is not None and not 0.01 <= self.mpp <= 100:
            raise ValueError(f"--mpp must be between 0.01 and 100 µm per pixel, got {self.mpp}")


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
        self.blend_glass = True  # fade the section's edge into white glass (False: the model's own pixels)

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

    @torch.no_grad()
    def seconds_per_window(self) -> float:
        """Seconds per window of one network evaluation, timed on one batch (after a warm-up call)."""
        b, w, dev = self.o.batch_size, self.window, self.run.device
        cond = self.run.condition(torch.zeros((b, self.run.channels, w, w)))
        x = torch.zeros((b, 3, w, w), device=dev)
        t = torch.zeros((b,), dtype=torch.long, device=dev)

        def call() -> None:
            y = self.run.model(x, t, cond) if self.run.is_diffusion else self.run.model(cond)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            del y

        call()
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) / b

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
        if not self.blend_glass:  # uncertainty takes quantiles first, then applies the tissue weight
            return rgb
        soft = self.mask.soft_box(y0, y1, x0, x1)[..., None]
        return rgb * soft + 255.0 * (1.0 - soft)  # glass is white; the section's edge fades into it


def calibrated_sampling(run: Run) -> dict[str, Any] | None:
    """The sampler, steps and eta ``RUN/calibration.json`` was made with (None: no calibration).

    The keys are those ``vstain calibrate`` writes (``uq/calibrate``); an unreadable
    file gives None here, and its one-line error where the calibration itself is used.
    """
    import json

    path = run.path / CALIBRATION_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sampler") is None:
        return None
    return {"sampler": meta.get("sampler"), "steps": meta.get("steps_effective"), "eta": meta.get("eta")}


def training_mpp(run: Run) -> float | None:
    """The run's training scale (µm/px): its config's dataset record, else its dataset.json if still there."""
    ds = run.config.get("dataset", {})
    if ds.get("mpp"):
        return float(ds["mpp"])
    meta_path = Path(str(ds.get("root", ""))) / "dataset.json"
    if ds.get("root") and meta_path.is_file():
        import json

        try:
            mpp = json.loads(meta_path.read_text()).get("mpp")
        except (OSError, ValueError):
            return None
        return float(mpp) if mpp else None
    return None


def fit_scale(run: Run, slide: TiffSlide, options: SlideOptions) -> tuple[TiffSlide, SlideScale]:
    """The slide at the model's scale (``io/resample``) and the scale decision (warnings, output µm/px)."""
    with input_errors():
        scale = plan_scale(slide.mpp, options.mpp, training_mpp(run), name=str(slide.path))
    if scale.resample:
        slide = ResampledSlide(slide, scale.factor, mpp=scale.model_mpp)
    return slide, scale


MAX_THUMBNAIL = 2048  # the long side of every PNG preview (thumbnail, uncertainty overlay) is at most this


def fit_within(img: np.ndarray, max_h: int, max_w: int | None = None) -> np.ndarray:
    """An (H, W) or (H, W, C) image shrunk by area averaging (a box filter) to at most max_h x max_w.

    The aspect ratio is kept; an image that fits is returned as is. Integer images
    stay integer (rounded), others come back as float32.
    """
    from PIL import Image

    max_w = max_h if max_w is None else max_w
    h, w = img.shape[:2]
    scale = min(max_h / h, max_w / w)
    if scale >= 1.0:
        return img
    nh, nw = max(1, min(max_h, round(h * scale))), max(1, min(max_w, round(w * scale)))
    planes = img.reshape(h, w, -1).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c]))
                               .resize((nw, nh), Image.Resampling.BOX))
                    for c in range(planes.shape[2])], axis=2)
    out = out.reshape((nh, nw) + img.shape[2:])
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out


def write_thumbnail_png(tiff_path: Path, png_path: Path, max_size: int = 1024) -> Path:
    """A PNG of the image, block-mean downsampled so its long side is <= max_size (and <= MAX_THUMBNAIL); atomic."""
    from PIL import Image

    max_size = min(max_size, MAX_THUMBNAIL)
    with open_image(tiff_path) as t:
        thumb, _ = t.thumbnail(max_size)
    thumb = fit_within(thumb, max_size)  # a pyramid level can leave the block-mean view above max_size
    img = thumb[..., :3] if thumb.shape[2] >= 3 else np.repeat(thumb, 3, axis=2)
    with atomic_output(png_path) as tmp:
        Image.fromarray(np.ascontiguousarray(img.astype(np.uint8))).save(tmp, format="PNG", optimize=True)
    return png_path


def require_diffusion(run: Run) -> None:
    """InputError unless ``run`` samples: regression and pix2pix give one output per input."""
    if run.kind == "stainnet":
        raise InputError("is a StainNet run (a classifier); choose a diffusion run", run.path)
    if not run.is_diffusion:
        raise InputError(f"is a {run.kind} run: it is deterministic (one output per input), so there is "
                         "no sample spread to measure; use a diffusion run", run.path)
