"""``vstain demo``: the whole pipeline on phantom data, in minutes on a CPU.

synth -> tile -> train (tiny diffusion, regression, pix2pix, StainNet) ->
calibrate -> stain a test slide (diffusion and regression) -> uncertainty maps
-> score (FSD, L1, L2, PSNR, SSIM; FID when Inception weights are given) ->
report.html. Every stage skips work that is already done, so an interrupted
demo resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import ensure_writable_dir, record, write_json

MODELS = ("diffusion", "regression", "pix2pix")


@dataclass
class DemoOptions:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    slides: int = 12
    size: tuple[int, int] = (768, 768)
    channels: int = 26
    tile: int = 32
    diffusion_steps: int = 600
    baseline_steps: int = 300
    stainnet_steps: int = 600
    batch_size: int = 16
    sampler: str = "ddim"
    sample_steps: int = 10
    samples: int = 8            # diffusion samples per pixel for calibration and uncertainty
    calibration_tiles: int = 96
    score_tiles: int = 256
    inception_weights: Path | None = None
    device: str = "auto"
    seed: int = 0

    def check(self) -> None:
        if self.slides < 4:
            raise InputError("--slides must be at least 4 (train, val and test need slides of their own)")
        if min(self.size) < 4 * self.tile:
            raise InputError(f"--size must be at least 4 tiles ({4 * self.tile} px) per side")
        if self.samples < 2:
            raise InputError("--samples must be at least 2")


@dataclass
class DemoResult:
    """Where the demo put things, and what it measured."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    score: dict | None = None
    calibration: dict | None = None


Stage = Callable[[str, str], None]


def _test_slide(dataset: Path) -> str:
    meta = json.loads((dataset / "dataset.json").read_text())
    tests = sorted(s for s, e in meta["slides"].items() if e["split"] == "test" and e["patches"])
    if not tests:
        raise InputError("the demo dataset has no test slide with tissue", dataset)
    return tests[0]


def run_demo(
    out: str | Path,
    options: DemoOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    stage: Stage | None = None,
) -> DemoResult:
    """Run every stage of the pipeline on phantom data into ``out``."""
    from vstain_cli.data.synth.render import synth
    from vstain_cli.data.tiling import TileOptions, tile
    from vstain_cli.infer.stain import StainOptions, stain_slide
    from vstain_cli.score.pipeline import EvaluateOptions, evaluate
    from vstain_cli.train.loop import train
    from vstain_cli.train.presets import load_preset
    from vstain_cli.train.run_folder import CALIBRATION_FILE
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    o = options or DemoOptions()
    o.check()
    progress = progress or NullProgress()
    stage = stage or (lambda name, detail: None)
    out = Path(out)
    if force and out.exists():
        if not (out / "demo.json").exists() and any(out.iterdir()):
            raise OutputExistsError("is not a vstain demo folder; refusing to delete it with --force", out)
        shutil.rmtree(out)
    ensure_writable_dir(out)
    res = DemoResult(out)
    write_json(out / "demo.json", record({"demo": {**asdict(o), "inception_weights": str(o.inception_weights)}}))

    def timed(name: str, detail: str, fn: Callable[[], object]) -> object:
        stage(name, detail)
        t = time.perf_counter()
        value = fn()
        res.seconds[name] = time.perf_counter() - t
        return value

    phantom, dataset, runs = out / "phantom", out / "dataset", out / "runs"
    pairs = phantom / "pairs.csv"
    if not pairs.exists():
        timed("synth", f"{o.slides} phantom slide pairs, {o.size[0]}x{o.size[1]} px, {o.channels} AF channels",
              lambda: synth(phantom, o.slides, o.size, o.channels, seed=o.seed, progress=progress))
    res.files["pairs"] = pairs
    timed("tile", f"{o.tile} px paired patches, split by slide",
          lambda: tile(pairs, dataset, TileOptions(size=o.tile, stride=o.tile, min_tissue=0.5), workers=2,
                       progress=progress))
    res.files["dataset"] = dataset

    plan = [("diffusion", "tiny-diffusion", o.diffusion_steps), ("regression", "tiny-regression", o.baseline_steps),
            ("pix2pix", "tiny-pix2pix", o.baseline_steps), ("stainnet", "tiny-stainnet", o.stainnet_steps)]
    for name, preset_name, steps in plan:
        preset = load_preset(preset_name).with_train(steps=steps, batch_size=o.batch_size, seed=o.seed)
        timed(f"train {name}", f"{preset_name}, {steps} steps",
              lambda p=preset, n=name: train(p, dataset, runs / n, device=o.device, progress=progress))
        res.files[f"run {name}"] = runs / name

    diffusion = runs / "diffusion"
    if not (diffusion / CALIBRATION_FILE).exists():
        copts = CalibrateOptions(samples=o.samples, n=o.calibration_tiles, sampler=o.sampler, steps=o.sample_steps,
                                 seed=o.seed, batch_size=o.batch_size, device=o.device)
        try:
            timed("calibrate", f"lambda on {o.calibration_tiles} val tiles x {o.samples} samples",
                  lambda: calibrate_run(diffusion, dataset, copts, progress=progress))
        except InputError as e:  # e.g. too few val tiles for the risk bound: go on uncalibrated
            progress.warn(f"calibration skipped: {e}")
    if (diffusion / CALIBRATION_FILE).exists():
        res.calibration = json.loads((diffusion / CALIBRATION_FILE).read_text())
        res.files["calibration"] = diffusion / CALIBRATION_FILE

    slide_id = _test_slide(dataset)
    af = phantom / f"{slide_id}.af.ome.tif"
    res.files["test slide H&E"] = phantom / f"{slide_id}.he.tif"
    for name in ("diffusion", "regression"):
        target = out / "stained" / f"{slide_id}.{name}.tif"
        if not target.exists():
            sopts = StainOptions(sampler=o.sampler, steps=o.sample_steps, batch_size=o.batch_size, device=o.device,
                                 seed=o.seed)
            timed(f"stain {name}", f"{slide_id} (test split), whole slide",
                  lambda t=target, n=name: stain_slide(af, runs / n, t, sopts, progress=progress))
        res.files[f"stained {name}"] = target
    unc = out / "uncertainty"
    if not unc.exists():
        uopts = UncertaintyOptions(sampler=o.sampler, steps=o.sample_steps, batch_size=o.batch_size,
                                   device=o.device, seed=o.seed, samples=o.samples)
        timed("uncertainty", f"{slide_id}, {o.samples} samples per pixel",
              lambda: uncertainty_slide(af, diffusion, unc, uopts, progress=progress))
    res.files["uncertainty"] = unc

    score_dir = out / "score"
    if not (score_dir / "score.json").exists():
        eopts = EvaluateOptions(models=[runs / m for m in MODELS], data=dataset, stainnet=runs / "stainnet",
                                inception_weights=o.inception_weights, n=o.score_tiles, seed=o.seed,
                                sampler=o.sampler, steps=o.sample_steps, batch_size=o.batch_size,
                                device=o.device, out_dir=score_dir, uncertainty_samples=o.samples)
        timed("score", f"{o.score_tiles} test tiles, same tiles and seeds for every model",
              lambda: evaluate(eopts, progress))
    res.score = json.loads((score_dir / "score.json").read_text())
    res.files["report"] = score_dir / "report.html"
    return res
