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
from vstain_cli.progress import NullProgress, Progress, info
from vstain_cli.provenance import ensure_writable_dir, record, write_json

MODELS = ("diffusion", "regression", "pix2pix")
# demo model name -> preset (models/demo-*.toml)
PRESETS = {"diffusion": "demo-diffusion", "regression": "demo-regression", "pix2pix": "demo-pix2pix",
           "stainnet": "demo-stainnet"}
# DemoOptions fields that decide the data and the trained models: bundled runs fit only the same values.
RECIPE_FIELDS = ("slides", "size", "channels", "mpp", "tile", "diffusion_steps", "baseline_steps",
                 "stainnet_steps", "seed")


@dataclass
class DemoOptions:
    """Sizes of the demo. The defaults are the bundled runs' recipe: 12 phantom slides at
    1 um/px, 32 px tiles (32 um of tissue, the field of view of the paper's 128 px at 40x)."""

    slides: int = 12
    size: tuple[int, int] = (768, 768)
    channels: int = 26
    mpp: float = 1.0
    tile: int = 32
    diffusion_steps: int | None = None   # None: the preset's (models/demo-*.toml)
    baseline_steps: int | None = None
    stainnet_steps: int | None = None
    batch_size: int | None = None   # training batch; None: the preset's
    inference_batch: int = 64
    sampler: str = "dpmpp-2m"
    sample_steps: int = 10
    samples: int = 8            # diffusion samples per pixel for calibration and uncertainty
    calibration_tiles: int = 200
    score_tiles: int = 512
    heldout_size: int = 384     # the held-out phantom slide that stain and uncertainty work on
    inception_weights: Path | None = None
    device: str = "auto"
    seed: int = 0
    retrain: bool = False

    def check(self) -> None:
        if self.slides < 4:
            raise InputError("--slides must be at least 4 (train, val and test need slides of their own)")
        if min(self.size) < 4 * self.tile:
            raise InputError(f"--size must be at least 4 tiles ({4 * self.tile} px) per side")
        if self.samples < 2:
            raise InputError("--samples must be at least 2")

    def recipe(self) -> dict:
        """The settings that decide the data and the models (JSON-ready; step counts resolved from the presets)."""
        from vstain_cli.train.presets import load_preset

        d = asdict(self)
        rec = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in RECIPE_FIELDS}
        for key, model in (("diffusion_steps", "diffusion"), ("baseline_steps", "regression"),
                           ("stainnet_steps", "stainnet")):
            if rec[key] is None:
                rec[key] = load_preset(PRESETS[model]).train.steps
        return rec


@dataclass
class DemoResult:
    """Where the demo put things, and what it measured."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    score: dict | None = None
    calibration: dict | None = None
    bundled: bool = False


Stage = Callable[[str, str], None]


def bundle_mismatch(o: DemoOptions) -> str | None:
    """Why the bundled runs cannot serve options ``o`` (None when they can)."""
    from vstain_cli.infer.bundled import BUNDLED, bundled_path, phantom_fingerprint, read_manifest

    manifest = read_manifest()
    if manifest is None or any(bundled_path(n) is None for n in BUNDLED.values()):
        return "this install has no bundled runs"
    recipe = manifest.get("recipe", {})
    differ = [k for k, v in o.recipe().items() if recipe.get(k) != v]
    if differ:
        return "the bundled runs were trained with other settings (" + ", ".join(
            f"{k} {recipe.get(k)} vs {o.recipe()[k]}" for k in differ) + ")"
    if manifest.get("phantom_fingerprint") != phantom_fingerprint():
        return ("the bundled runs were trained on another version of the phantom "
                f"({manifest.get('phantom_version')}); make new ones with `vstain demo --retrain --export-bundle`")
    return None


def copy_bundled_runs(runs: Path) -> None:
    """Copy the bundled runs into ``runs/NAME`` (the demo's own folders; the install stays untouched)."""
    from vstain_cli.infer.bundled import BUNDLED, SHIPPED_FILES, bundled_path

    for name, bundled in BUNDLED.items():
        src, dst = bundled_path(bundled), runs / name
        if (dst / "weights.safetensors").exists():
            continue
        tmp = runs / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in SHIPPED_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        tmp.rename(dst)


def export_bundle(res: DemoResult, options: DemoOptions, dest: Path, command: str) -> Path:
    """Write the demo's runs as bundled runs into ``dest`` (``models/runs``) with ``bundle.json``."""
    from vstain_cli.data.synth.version import PHANTOM_VERSION
    from vstain_cli.infer.bundled import BUNDLE_FILE, BUNDLE_FORMAT, BUNDLED, SHIPPED_FILES, phantom_fingerprint

    if res.bundled:
        raise InputError("--export-bundle needs --retrain (these runs came from the bundle)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, bundled in BUNDLED.items():
        src, tmp, final = res.out / "runs" / name, dest / f".{bundled}.partial", dest / bundled
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in SHIPPED_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    scores = {m: {k: v for k, v in r["metrics"].items()} for m, r in (res.score or {}).get("models", {}).items()}
    manifest = {"format": BUNDLE_FORMAT, "format_version": 1, "command": command,
                "recipe": options.recipe(), "phantom_version": PHANTOM_VERSION,
                "phantom_fingerprint": phantom_fingerprint(),
                "runs": dict(BUNDLED), "seconds": res.seconds, "scores": scores,
                "calibration": res.calibration, "stainnet": (res.score or {}).get("stainnet"),
                "provenance": record({"demo": options.recipe()})}
    write_json(dest / BUNDLE_FILE, manifest)
    return dest / BUNDLE_FILE


def _heldout_pair(folder: Path, o: DemoOptions, progress: Progress) -> tuple[str, Path, Path]:
    """A phantom pair that no model saw (grade 2, its own seed), small enough to sample many times."""
    from vstain_cli.data.synth.render import SlideSpec, write_pair

    slide_id = "heldout-000"
    af, he = folder / f"{slide_id}.af.ome.tif", folder / f"{slide_id}.he.tif"
    if not (af.exists() and he.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        n = max(min(o.heldout_size, *o.size), 4 * o.tile)
        spec = SlideSpec.random(slide_id, 2, n, n, o.channels, o.mpp, o.seed * 100003 + 99991)
        progress.start(slide_id, f"synth {slide_id} (label 2, held out)", n)
        write_pair(spec, af, he, workers=1, progress=progress)
        progress.finish(slide_id)
    return slide_id, af, he


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
    config = {"demo": {**asdict(o), "inception_weights": str(o.inception_weights)}}
    write_json(out / "demo.json", record(config))

    def timed(name: str, detail: str, fn: Callable[[], object]) -> object:
        stage(name, detail)
        t = time.perf_counter()
        value = fn()
        res.seconds[name] = time.perf_counter() - t
        return value

    phantom, dataset, runs = out / "phantom", out / "dataset", out / "runs"
    pairs = phantom / "pairs.csv"
    if not pairs.exists():
        timed("synth", f"{o.slides} phantom slide pairs, {o.size[0]}x{o.size[1]} px at {o.mpp:g} um/px, "
                       f"{o.channels} AF channels",
              lambda: synth(phantom, o.slides, o.size, o.channels, mpp=o.mpp, seed=o.seed, progress=progress))
    res.files["pairs"] = pairs
    timed("tile", f"{o.tile} px paired patches ({o.tile * o.mpp:g} um of tissue), split by slide",
          lambda: tile(pairs, dataset, TileOptions(size=o.tile, stride=o.tile, min_tissue=0.5), workers=2,
                       progress=progress))
    res.files["dataset"] = dataset

    why_not = None if o.retrain else bundle_mismatch(o)
    if why_not is None and not o.retrain:
        timed("bundled runs", "phantom-trained diffusion, regression, pix2pix and StainNet (vstain demo --retrain)",
              lambda: copy_bundled_runs(runs))
        res.bundled = True
    else:
        if not o.retrain:
            info(progress, f"training from scratch: {why_not}")
        steps = {"diffusion": o.diffusion_steps, "regression": o.baseline_steps, "pix2pix": o.baseline_steps,
                 "stainnet": o.stainnet_steps}
        for name, preset_name in PRESETS.items():
            preset = load_preset(preset_name)
            overrides = {"seed": o.seed}
            if steps[name] is not None:
                overrides["steps"] = steps[name]
            if o.batch_size is not None:
                overrides["batch_size"] = o.batch_size
            preset = preset.with_train(**overrides)
            timed(f"train {name}", f"{preset_name}, {preset.train.steps} steps",
                  lambda p=preset, n=name: train(p, dataset, runs / n, device=o.device, progress=progress))
    for name in PRESETS:
        res.files[f"run {name}"] = runs / name

    diffusion = runs / "diffusion"
    if not (diffusion / CALIBRATION_FILE).exists():
        copts = CalibrateOptions(samples=o.samples, n=o.calibration_tiles, sampler=o.sampler, steps=o.sample_steps,
                                 seed=o.seed, batch_size=o.inference_batch, device=o.device)
        try:
            timed("calibrate", f"lambda on {o.calibration_tiles} val tiles x {o.samples} samples",
                  lambda: calibrate_run(diffusion, dataset, copts, progress=progress))
        except InputError as e:  # e.g. too few val tiles for the risk bound: go on uncalibrated
            progress.warn(f"calibration skipped: {e}")
    if (diffusion / CALIBRATION_FILE).exists():
        res.calibration = json.loads((diffusion / CALIBRATION_FILE).read_text())
        res.files["calibration"] = diffusion / CALIBRATION_FILE

    slide_id, af, he = _heldout_pair(out / "heldout", o, progress)
    res.files["held-out slide AF"], res.files["held-out slide H&E"] = af, he
    for name in ("diffusion", "regression"):
        target = out / "stained" / f"{slide_id}.{name}.tif"
        if not target.exists():
            sopts = StainOptions(sampler=o.sampler, steps=o.sample_steps, batch_size=o.inference_batch, device=o.device,
                                 seed=o.seed)
            timed(f"stain {name}", f"{slide_id}, a held-out phantom slide, whole slide",
                  lambda t=target, n=name: stain_slide(af, runs / n, t, sopts, progress=progress))
        res.files[f"stained {name}"] = target
    unc = out / "uncertainty"
    if not unc.exists():
        uopts = UncertaintyOptions(sampler=o.sampler, steps=o.sample_steps, batch_size=o.inference_batch,
                                   device=o.device, seed=o.seed, samples=o.samples)
        timed("uncertainty", f"{slide_id}, {o.samples} samples per pixel",
              lambda: uncertainty_slide(af, diffusion, unc, uopts, reference=he,
                                        progress=progress))
    res.files["uncertainty"] = unc

    score_dir = out / "score"
    if not (score_dir / "score.json").exists():
        eopts = EvaluateOptions(models=[runs / m for m in MODELS], data=dataset, stainnet=runs / "stainnet",
                                inception_weights=o.inception_weights, n=o.score_tiles, seed=o.seed,
                                sampler=o.sampler, steps=o.sample_steps, batch_size=o.inference_batch,
                                device=o.device, out_dir=score_dir, uncertainty_samples=o.samples)
        timed("score", f"{o.score_tiles} test tiles, same tiles and seeds for every model",
              lambda: evaluate(eopts, progress))
    res.score = json.loads((score_dir / "score.json").read_text())
    res.files["report"] = score_dir / "report.html"
    # how this run went: its stage timings and where the models came from (bench/demo_figures.py --from)
    write_json(out / "demo.json", {**record(config), "seconds": res.seconds, "bundled": res.bundled})
    return res
