"""``vstain demo``: the whole pipeline on phantom data, in minutes on a CPU.

The stages run in the order of ``STAGES``: data (synth -> tile) -> models
(the bundled runs, or train diffusion, regression, pix2pix and StainNet) ->
distill (``vstain distill`` of the diffusion run: 4- and 2-step samplers and the
one-call interval run) -> calibrate (diffusion and the interval run) -> stain a
held-out slide (diffusion, its 4-step student, regression) -> uncertainty maps
(8 samples x 10 steps, and the interval run's one call per window) -> score
(FSD, PFD, L1, L2, PSNR, SSIM; FID when Inception weights are given; the
distilled runs each with their own K DDIM steps) -> report.html. Every stage
skips work that is already done, so an interrupted demo resumes where it
stopped; each attempt of each step (started, seconds, completed) is logged in
``demo.json`` and ``--export-bundle`` copies that log, the runs' metrics.jsonl
and the dataset's split sizes and fingerprint into ``bundle.json``.

To add a stage: write ``def _stage(ctx: DemoContext)`` that runs its work through
``ctx.timed(name, detail, fn)`` and skips what is done, insert it into ``STAGES``,
and add any run it makes to ``infer.bundled.BUNDLED`` so that ``--export-bundle``
ships it (``_distill`` is an example).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vstain_cli.errors import InputError
from vstain_cli.io.outputs import FolderOutput
from vstain_cli.progress import NullProgress, Progress, info
from vstain_cli.provenance import ensure_writable_dir, record, write_json

if TYPE_CHECKING:
    from vstain_cli.train.presets import Preset

MODELS = ("diffusion", "regression", "pix2pix")
# demo model name -> preset (models/demo-*.toml)
PRESETS = {"diffusion": "demo-diffusion", "regression": "demo-regression", "pix2pix": "demo-pix2pix",
           "stainnet": "demo-stainnet"}
# DemoOptions fields that decide the data and the trained models: bundled runs fit only the same values.
# (``phantom_seed`` is not one: the runs do not depend on the phantom a demo scores them on.)
RECIPE_FIELDS = ("slides", "size", "channels", "mpp", "tile", "seed")
TILE_MIN_TISSUE = 0.5
# `vstain distill` runs of the distill stage: demo model name -> (its teacher, K network calls per window).
# The 2-step run continues the 4-step one (4 -> 2), so the 16 -> 8 -> 4 phases are paid once.
DISTILLED = {"diffusion-4step": ("diffusion", 4), "diffusion-2step": ("diffusion-4step", 2)}
INTERVAL_RUN = "diffusion-intervals"   # the one-call interval run (`vstain distill --intervals`) of diffusion
TEACHER_STEPS = 16                     # DDIM steps of the diffusion run that the first halving phase learns from


@dataclass
class DemoOptions:
    """Sizes of the demo. The defaults are the bundled runs' recipe: 40 phantom slides (10 per grade,
    split 20/8/12 by slide and stratified by grade: 3 test and 2 val slides of every grade) at 1 um/px,
    32 px tiles (32 um of tissue, the field of view of the paper's 128 px at 40x)."""

    slides: int = 40
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
    calibration_scales: tuple[float, ...] = (4.0, 16.0)   # structure scales (um) calibrated next to pixels
    score_tiles: int = 512
    heldout_size: int = 384     # the held-out phantom slide that stain and uncertainty work on
    inception_weights: Path | None = None
    device: str = "auto"
    seed: int = 0
    phantom_seed: int | None = None   # the phantom's seed; None: ``seed`` (another: slides no bundled run saw)
    retrain: bool = False
    reuse_bundled_calibration: bool = False   # copy the bundled calibration.json instead of calibrating
    # distill stage (used when the demo trains): optimizer steps (batch 16) per halving phase of each distilled
    # sampler (16 -> 8 -> 4, then 4 -> 2: 3 phases) and of the interval fine-tune. 3 x 1000 x 0.14 s +
    # 2000 x 0.10 s: about 10 minutes on 2 cores. None: a third (phases) and two thirds (interval fine-tune) of
    # the diffusion run's training steps, so a short ``--diffusion-steps`` demo distils briefly too.
    distill_phase_steps: int | None = None
    interval_steps: int | None = None

    def __post_init__(self) -> None:
        if self.distill_phase_steps is None or self.interval_steps is None:
            from vstain_cli.train.presets import load_preset

            teacher = self.diffusion_steps or load_preset(PRESETS["diffusion"]).train.steps
            if self.distill_phase_steps is None:
                self.distill_phase_steps = max(1, teacher // 3)
            if self.interval_steps is None:
                self.interval_steps = max(1, 2 * teacher // 3)

    def check(self) -> None:
        if self.slides < 4:
            raise InputError("--slides must be at least 4 (train, val and test need slides of their own)")
        if min(self.size) < 4 * self.tile:
            raise InputError(f"--size must be at least 4 tiles ({4 * self.tile} px) per side")
        if self.samples < 2:
            raise InputError("--samples must be at least 2")
        if self.phantom_seed is not None and self.phantom_seed < 0:
            raise InputError("--phantom-seed must be >= 0")
        if self.reuse_bundled_calibration and self.retrain:
            raise InputError("--reuse-bundled-calibration needs the bundled runs (not --retrain)")
        if self.distill_phase_steps < 1 or self.interval_steps < 1:
            raise InputError("--distill-phase-steps and --interval-steps must be at least 1")

    @property
    def data_seed(self) -> int:
        """The seed of the phantom this demo makes."""
        return self.seed if self.phantom_seed is None else self.phantom_seed

    def recipe(self) -> dict:
        """The settings that decide the data and the models (JSON-ready; steps and batch from the presets)."""
        from vstain_cli.train.presets import load_preset

        d = asdict(self)
        rec = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in RECIPE_FIELDS}
        rec["train"] = {name: {"preset": PRESETS[name], "steps": p.train.steps, "batch_size": p.train.batch_size,
                               "keep": p.train.keep}
                        for name, p in ((n, self.preset(n, load_preset(PRESETS[n]))) for n in PRESETS)}
        rec["distill"] = {**{name: {"teacher": teacher, "steps": k, "phase_steps": self.distill_phase_steps,
                                    "teacher_steps": TEACHER_STEPS if teacher == "diffusion" else DISTILLED[teacher][1]}
                             for name, (teacher, k) in DISTILLED.items()},
                          INTERVAL_RUN: {"teacher": "diffusion", "intervals": True, "steps": self.interval_steps}}
        return rec

    def preset(self, name: str, base: Preset) -> Preset:
        """``base`` (the preset of demo model ``name``) with this demo's steps, batch size and seed."""
        steps = {"diffusion": self.diffusion_steps, "regression": self.baseline_steps,
                 "pix2pix": self.baseline_steps, "stainnet": self.stainnet_steps}[name]
        return base.with_train(seed=self.seed, steps=steps, batch_size=self.batch_size)


@dataclass
class DemoResult:
    """Where the demo put things, and what it measured."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    score: dict | None = None
    calibration: dict | None = None
    bundled: bool = False
    calibration_source: str = ""      # "calibrated by this demo" or where a reused calibration came from
    fresh_phantom: bool = False       # scored on a phantom seed that no bundled run was trained on
    training: dict[str, dict] = field(default_factory=dict)   # model -> steps, batch, best step (train_summary)
    interval_calibration: dict | None = None   # calibration.json of the interval run
    comparison: list[str] = field(default_factory=list)   # the cheap runs against the full sampler, in numbers


Stage = Callable[[str, str], None]


@dataclass
class DemoContext:
    """What every stage function of ``STAGES`` gets."""

    o: DemoOptions
    out: Path
    progress: Progress
    res: DemoResult
    timed: Callable[[str, str, Callable[[], Any]], Any]

    @property
    def phantom(self) -> Path:
        return self.out / "phantom"

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

    @property
    def runs(self) -> Path:
        return self.out / "runs"


# --- the dataset's identity, for the bundle check ---------------------------------------------------------

def split_sizes(dataset: str | Path) -> dict[str, dict[str, int]]:
    """Slides and patches per split of a tiled dataset (from its dataset.json)."""
    meta = json.loads((Path(dataset) / "dataset.json").read_text())
    sizes: dict[str, dict[str, int]] = {}
    for entry in meta.get("slides", {}).values():
        s = sizes.setdefault(entry["split"], {"slides": 0, "patches": 0})
        s["slides"] += 1
        s["patches"] += int(entry["patches"])
    return dict(sorted(sizes.items()))


def tiler_fingerprint(dataset: str | Path) -> str:
    """SHA-256 of the tiler's index.csv (every patch: split, slide, position, label, tissue fraction)."""
    return hashlib.sha256((Path(dataset) / "index.csv").read_bytes()).hexdigest()


def bundle_mismatch(o: DemoOptions, dataset: str | Path | None = None, root: Path | None = None) -> str | None:
    """Why the bundled runs cannot serve options ``o`` (None when they can), in one line.

    Checks the recipe and the phantom's version, then ``bundle_dataset_mismatch``
    when ``dataset`` is given. ``root``: the bundle folder (default: the installed one).
    """
    from vstain_cli.infer.bundled import BUNDLED, bundled_path, phantom_fingerprint, read_manifest

    manifest = read_manifest(root)
    if manifest is None or any(bundled_path(n, root) is None for n in BUNDLED.values()):
        return "this install has no bundled runs"
    recipe, mine = manifest.get("recipe", {}), o.recipe()
    differ = [k for k in sorted(set(recipe) | set(mine)) if recipe.get(k) != mine.get(k)]
    if differ:
        return "the bundled runs were trained with other settings (" + "; ".join(
            f"{k} {json.dumps(recipe.get(k))} vs {json.dumps(mine.get(k))}" for k in differ) + ")"
    if manifest.get("phantom_fingerprint") != phantom_fingerprint():
        return ("the bundled runs were trained on another version of the phantom "
                f"({manifest.get('phantom_version')}); make new ones with `vstain demo --retrain --export-bundle`")
    return None if dataset is None else bundle_dataset_mismatch(o, dataset, root)


def bundle_dataset_mismatch(o: DemoOptions, dataset: str | Path, root: Path | None = None) -> str | None:
    """On the phantom seed the bundled runs were trained on: why the regenerated ``dataset`` is not the one
    they were trained on (split sizes or the tiler's index.csv fingerprint differ), else None. A phantom of
    another seed is not compared (its slides are new to the runs)."""
    from vstain_cli.infer.bundled import read_manifest

    manifest = read_manifest(root) or {}
    data = manifest.get("dataset") or {}
    if o.data_seed == manifest.get("phantom_seed", manifest.get("recipe", {}).get("seed")):
        have, fp = split_sizes(dataset), tiler_fingerprint(dataset)
        if have != data.get("splits") or fp != data.get("index_sha256"):
            show = lambda s: "/".join(f"{k} {v['slides']}:{v['patches']}" for k, v in (s or {}).items())  # noqa: E731
            return (f"the regenerated dataset differs from the one the bundled runs were trained on (slides:patches "
                    f"{show(data.get('splits'))} vs {show(have)}; index.csv {str(data.get('index_sha256'))[:12]} "
                    f"vs {fp[:12]}); make new ones with `vstain demo --retrain --export-bundle`")
    return None


def copy_bundled_runs(runs: Path, *, calibration: bool = False, root: Path | None = None) -> None:
    """Copy the bundled runs (of ``root``, default the installed ones) into ``runs/NAME`` (the demo's own
    folders; the install stays untouched).

    ``calibration.json`` is copied only with ``calibration=True``: the demo calibrates on its own val slides.
    """
    from vstain_cli.infer.bundled import BUNDLED, SHIPPED_FILES, bundled_path, publish_run_copy
    from vstain_cli.train.run_folder import CALIBRATION_FILE, WEIGHTS

    for name, bundled in BUNDLED.items():
        src, dst = bundled_path(bundled, root), runs / name
        if not (dst / WEIGHTS).exists():
            publish_run_copy(src, dst, [f for f in SHIPPED_FILES if f != CALIBRATION_FILE])
        if calibration and (src / CALIBRATION_FILE).exists() and not (dst / CALIBRATION_FILE).exists():
            shutil.copy2(src / CALIBRATION_FILE, dst / CALIBRATION_FILE)


def train_summary(run: str | Path) -> dict[str, Any]:
    """A trained run's budget and result: steps, batch, kept weights (best step, its val loss), wall seconds
    spent training, and its resumes (from config.json and metrics.jsonl)."""
    from vstain_cli.train import run_folder

    run = Path(run)
    cfg = json.loads((run / run_folder.CONFIG).read_text())
    t = cfg["preset"]["train"]
    end = run_folder.end_record(run) or {}
    resumes = run_folder.resumes(run)
    summary = {"preset": cfg["preset"]["name"], "steps": int(end.get("step", t["steps"])),
               "batch_size": t["batch_size"], "keep": t.get("keep", "last"), "best_step": end.get("best_step"),
               "best_val_loss": end.get("value"), "train_seconds": end.get("elapsed_s"),
               "resumes": [{"step": r["step"], "time": r.get("time"), "command": r.get("command")} for r in resumes]}
    d = cfg.get("distill")
    if isinstance(d, dict):  # a `vstain distill` run: how it was distilled, from what
        keys = ("method", "steps", "network_calls", "teacher_steps", "phase_steps", "phases", "quantiles", "teacher")
        summary["distill"] = {k: d[k] for k in keys if k in d}
    return summary


def _training_notes(training: dict[str, dict]) -> list[str]:
    """One line per model for the report: optimizer steps, batch, the step whose weights were kept."""
    lines = []
    for name, t in training.items():
        kept = (f"exported at its best validation, step {t['best_step']} (val loss {t['best_val_loss']:.4g})"
                if t.get("best_step") is not None else "exported at its last step")
        d = t.get("distill") or {}
        how = ""
        if d.get("method") == "progressive":
            grid = " -> ".join(str(p["teacher_steps"]) for p in d.get("phases", [])) + f" -> {d.get('steps')}"
            how = f" (progressive distillation, DDIM steps {grid}, {d.get('phase_steps')} steps per phase)"
        elif d:
            how = f" (interval fine-tune, {d.get('network_calls', 1)} network call per window)"
        lines.append(f"{name}: {t['steps']} optimizer steps of batch {t['batch_size']}{how}, {kept}")
    return lines


def stage_seconds(out: Path, name: str) -> float | None:
    """Wall seconds of the last completed attempt of step ``name`` in demo.json's log (None: never completed)."""
    done = [a for a in read_stage_log(out).get(name, []) if a.get("completed")]
    return float(done[-1]["seconds"]) if done else None


def _ci(m: dict[str, float] | None) -> str:
    if not m:
        return "n/a"
    lo, hi = m.get("lo"), m.get("hi")
    return f"{m['value']:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else "")


def _overlap(a: dict[str, float] | None, b: dict[str, float] | None) -> str:
    if not a or not b or None in (a.get("lo"), a.get("hi"), b.get("lo"), b.get("hi")):
        return ""
    return "intervals overlap" if a["lo"] <= b["hi"] and b["lo"] <= a["hi"] else "intervals disjoint"


def _coverage(cal: dict[str, Any] | None) -> str:
    t = (cal or {}).get("test_coverage") or {}
    if "coverage" not in t:
        return "not calibrated"
    return f"test coverage {t['coverage']:.3f} at mean width {t.get('mean_width_255', float('nan')):.1f}/255"


def interval_notes(ctx: DemoContext) -> list[str]:
    """The interval run against the 8 x 10 sampled intervals (and the trivial band around regression): calibrated
    test coverage, mean width and the held-out slide's map seconds, from this demo's files."""
    from vstain_cli.train.run_folder import CALIBRATION_FILE

    def read(path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.is_file() else None

    o = ctx.o
    diff, iv = read(ctx.runs / "diffusion" / CALIBRATION_FILE), read(ctx.runs / INTERVAL_RUN / CALIBRATION_FILE)
    if iv is None:
        return []
    band = ((diff or {}).get("baselines") or {}).get("baseline_run") or {}
    t_s, t_iv = stage_seconds(ctx.out, "uncertainty"), stage_seconds(ctx.out, "uncertainty intervals")
    speed = (f"; held-out slide maps {t_iv:.1f} s vs {t_s:.1f} s ({t_s / t_iv:.0f}x faster)"
             if t_s and t_iv else "")
    lines = [f"Intervals (alpha {iv.get('alpha')}, delta {iv.get('delta')}): {INTERVAL_RUN}, one network call per "
             f"tile: {_coverage(iv)}; diffusion, {o.samples} samples x {o.sample_steps} steps "
             f"({o.samples * o.sample_steps} calls): {_coverage(diff)}; trivial band around regression: "
             f"{_coverage(band)}{speed}."]
    verdict = [_against_band(name, cal) for name, cal in ((INTERVAL_RUN, iv), ("diffusion", diff))]
    return lines + [v for v in verdict if v]


def _against_band(name: str, cal: dict[str, Any] | None) -> str:
    """Whether ``name``'s calibrated test intervals are narrower than the trivial band around regression at the
    same test coverage (``calibrate --baseline``'s ``matched`` band: its constant widened or narrowed until its
    coverage equals the model's)."""
    t = (cal or {}).get("test_coverage") or {}
    band = (((cal or {}).get("baselines") or {}).get("baseline_run") or {}).get("matched") or {}
    w, wb = t.get("mean_width_255"), band.get("mean_width_255")
    if w is None or wb is None:
        return ""
    at = f"{w:.1f} vs {wb:.1f}/255 at test coverage {t.get('coverage', float('nan')):.3f}"
    if w < wb:
        return f"{name}'s intervals are narrower than the trivial band around regression ({at})."
    return (f"{name}'s intervals are NOT narrower than the trivial band around regression ({at}): they do not "
            "beat a constant band here.")


def cost_comparison(ctx: DemoContext) -> list[str]:
    """Each distilled run against the full sampler (the diffusion run, DPM-Solver++ at the demo's steps) on the
    scored test tiles (FSD, PFD, L1 with slide-level 95 % intervals) and the held-out slide's stain seconds;
    then ``interval_notes``."""
    models = (ctx.res.score or {}).get("models", {})
    full = models.get("diffusion", {}).get("metrics", {})
    lines = []
    for name, (_, k) in DISTILLED.items():
        m = models.get(name, {}).get("metrics")
        if not m:
            continue
        parts = []
        for key in ("FSD", "PFD", "L1"):
            if key in m and key in full:
                ratio = m[key]["value"] / full[key]["value"] if full[key]["value"] else float("nan")
                both = _overlap(m[key], full[key])
                parts.append(f"{key} {_ci(m[key])} vs {_ci(full[key])} (x{ratio:.2f}{'; ' + both if both else ''})")
        t_k, t_full = stage_seconds(ctx.out, f"stain {name}"), stage_seconds(ctx.out, "stain diffusion")
        if t_k and t_full:
            parts.append(f"held-out slide {t_k:.1f} s vs {t_full:.1f} s")
        lines.append(f"{name} ({k} DDIM calls per tile) vs diffusion ({ctx.o.sampler} {ctx.o.sample_steps}): "
                     + "; ".join(parts))
    return lines + interval_notes(ctx)


# --- the stages --------------------------------------------------------------------------------------------

def _data(ctx: DemoContext) -> None:
    """synth and tile the phantom."""
    from vstain_cli.data.synth.render import synth
    from vstain_cli.data.tiling import TileOptions, tile

    o, pairs = ctx.o, ctx.phantom / "pairs.csv"
    if not pairs.exists():
        ctx.timed("synth", f"{o.slides} phantom slide pairs (seed {o.data_seed}), {o.size[0]}x{o.size[1]} px at "
                           f"{o.mpp:g} um/px, {o.channels} AF channels",
                  lambda: synth(ctx.phantom, o.slides, o.size, o.channels, mpp=o.mpp, seed=o.data_seed,
                                progress=ctx.progress))
    ctx.res.files["pairs"] = pairs
    ctx.timed("tile", f"{o.tile} px paired patches ({o.tile * o.mpp:g} um of tissue), split by slide",
              lambda: tile(pairs, ctx.dataset, TileOptions(size=o.tile, stride=o.tile, min_tissue=TILE_MIN_TISSUE),
                           workers=2, progress=ctx.progress))
    ctx.res.files["dataset"] = ctx.dataset


def _models(ctx: DemoContext) -> None:
    """The bundled runs when they fit (copied), else train every model from scratch."""
    from vstain_cli.infer.bundled import read_manifest
    from vstain_cli.train.loop import train
    from vstain_cli.train.presets import load_preset

    o, res = ctx.o, ctx.res
    why_not = None if o.retrain else bundle_mismatch(o)
    if why_not is None and not o.retrain:
        stale = bundle_dataset_mismatch(o, ctx.dataset)
        if stale:  # same recipe, other data: the bundle is stale (a changed tiler or phantom), refuse it
            raise InputError(f"{stale}, or pass --retrain", ctx.dataset / "index.csv")
        ctx.timed("bundled runs", "phantom-trained diffusion, regression, pix2pix and StainNet "
                                  "(vstain demo --retrain)",
                  lambda: copy_bundled_runs(ctx.runs, calibration=o.reuse_bundled_calibration))
        res.bundled = True
        manifest = read_manifest() or {}
        res.fresh_phantom = o.data_seed != manifest.get("phantom_seed", manifest.get("recipe", {}).get("seed"))
        if res.fresh_phantom:
            info(ctx.progress, f"phantom seed {o.data_seed}: every slide is new to the bundled runs "
                               f"(trained on seed {manifest.get('phantom_seed')})")
    else:
        if o.reuse_bundled_calibration:
            raise InputError(f"--reuse-bundled-calibration: the bundled runs cannot be used ({why_not})")
        if not o.retrain:
            info(ctx.progress, f"training from scratch: {why_not}")
        for name, preset_name in PRESETS.items():
            preset = o.preset(name, load_preset(preset_name))
            ctx.timed(f"train {name}", f"{preset_name}, {preset.train.steps} steps of batch {preset.train.batch_size}",
                      lambda p=preset, n=name: train(p, ctx.dataset, ctx.runs / n, device=o.device,
                                                     progress=ctx.progress))
    for name in PRESETS:
        res.files[f"run {name}"] = ctx.runs / name
        if name != "stainnet":
            res.training[name] = train_summary(ctx.runs / name)


def _distill(ctx: DemoContext) -> None:
    """The diffusion run distilled (``vstain distill``) into 4- and 2-step DDIM samplers and a one-call interval
    run; skipped with the bundled runs (they ship these too). Resumes like training."""
    from vstain_cli.train.distill import DistillOptions, distill

    o, res = ctx.o, ctx.res
    if not res.bundled:
        jobs = {name: DistillOptions(steps=k, phase_steps=o.distill_phase_steps, seed=o.seed,
                                     teacher_steps=TEACHER_STEPS if teacher == "diffusion" else None)
                for name, (teacher, k) in DISTILLED.items()}
        jobs[INTERVAL_RUN] = DistillOptions(intervals=True, phase_steps=o.interval_steps, seed=o.seed)
        teachers = {**{name: teacher for name, (teacher, _) in DISTILLED.items()}, INTERVAL_RUN: "diffusion"}
        for name, opts in jobs.items():
            if opts.intervals:
                what = f"{teachers[name]} -> one-call interval run, {opts.phase_steps} steps of batch {opts.batch_size}"
            else:
                n0 = opts.teacher_steps or DISTILLED[teachers[name]][1]
                what = (f"{teachers[name]} (DDIM {n0}) -> {opts.steps} DDIM steps, progressive distillation, "
                        f"{opts.phase_steps} steps of batch {opts.batch_size} per halving phase")
            ctx.timed(f"distill {name}", what,
                      lambda n=name, d=opts: distill(ctx.runs / teachers[n], ctx.runs / n, d, data=ctx.dataset,
                                                     device=o.device, progress=ctx.progress))
    for name in (*DISTILLED, INTERVAL_RUN):
        res.files[f"run {name}"] = ctx.runs / name
        res.training[name] = train_summary(ctx.runs / name)


def _calibrate(ctx: DemoContext) -> None:
    """lambda on the val slides (every grade), coverage on the test slides; the trivial band around the
    regression output and the structure scales alongside."""
    from vstain_cli.train.run_folder import CALIBRATION_FILE
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    o, res, diffusion = ctx.o, ctx.res, ctx.runs / "diffusion"
    if o.reuse_bundled_calibration:
        res.calibration_source = ("reused from the bundled phantom-diffusion (--reuse-bundled-calibration), "
                                  "not calibrated on this demo's val slides")
    elif not (diffusion / CALIBRATION_FILE).exists():
        copts = CalibrateOptions(samples=o.samples, n=o.calibration_tiles, sampler=o.sampler, steps=o.sample_steps,
                                 seed=o.seed, batch_size=o.inference_batch, device=o.device,
                                 baseline=str(ctx.runs / "regression"), scales=tuple(o.calibration_scales))
        try:
            ctx.timed("calibrate", f"lambda on {o.calibration_tiles} val tiles x {o.samples} samples",
                      lambda: calibrate_run(diffusion, ctx.dataset, copts, progress=ctx.progress))
        except InputError as e:  # e.g. too few val tiles for the risk bound: go on uncalibrated
            ctx.progress.warn(f"calibration skipped: {e}")
    if (diffusion / CALIBRATION_FILE).exists():
        res.calibration = json.loads((diffusion / CALIBRATION_FILE).read_text())
        res.files["calibration"] = diffusion / CALIBRATION_FILE
        res.calibration_source = res.calibration_source or "calibrated by this demo on its val slides"
    # the interval run: lambda of its one-call bounds, by the same RCPS on the same val tiles
    iv = ctx.runs / INTERVAL_RUN
    if not o.reuse_bundled_calibration and not (iv / CALIBRATION_FILE).exists():
        iopts = CalibrateOptions(n=o.calibration_tiles, seed=o.seed, batch_size=o.inference_batch, device=o.device,
                                 baseline=str(ctx.runs / "regression"), scales=tuple(o.calibration_scales))
        try:
            ctx.timed("calibrate intervals", f"lambda of {INTERVAL_RUN}'s bounds on {o.calibration_tiles} val tiles, "
                                             "one network call per tile",
                      lambda: calibrate_run(iv, ctx.dataset, iopts, progress=ctx.progress))
        except InputError as e:
            ctx.progress.warn(f"calibration of {INTERVAL_RUN} skipped: {e}")
    if (iv / CALIBRATION_FILE).exists():
        res.interval_calibration = json.loads((iv / CALIBRATION_FILE).read_text())
        res.files["calibration intervals"] = iv / CALIBRATION_FILE


def _heldout_pair(folder: Path, o: DemoOptions, progress: Progress) -> tuple[str, Path, Path]:
    """A phantom pair that no model saw (grade 2, its own seed), small enough to sample many times."""
    from vstain_cli.data.synth.render import SlideSpec, write_pair

    slide_id = "heldout-000"
    af, he = folder / f"{slide_id}.af.ome.tif", folder / f"{slide_id}.he.tif"
    if not (af.exists() and he.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        n = max(min(o.heldout_size, *o.size), 4 * o.tile)
        spec = SlideSpec.random(slide_id, 2, n, n, o.channels, o.mpp, o.data_seed * 100003 + 99991)
        progress.start(slide_id, f"synth {slide_id} (label 2, held out)", n)
        write_pair(spec, af, he, workers=1, progress=progress)
        progress.finish(slide_id)
    return slide_id, af, he


def _stain(ctx: DemoContext) -> None:
    """Stain a held-out slide with diffusion (DPM-Solver++, and its 4-step student's own DDIM) and regression."""
    from vstain_cli.infer.stain import StainOptions, stain_slide

    o, res = ctx.o, ctx.res
    slide_id, af, he = _heldout_pair(ctx.out / "heldout", o, ctx.progress)
    res.files["held-out slide AF"], res.files["held-out slide H&E"] = af, he
    for name in ("diffusion", "diffusion-4step", "regression"):
        target = ctx.out / "stained" / f"{slide_id}.{name}.tif"
        if not target.exists():
            sampler, steps = ("ddim", None) if name in DISTILLED else (o.sampler, o.sample_steps)  # K steps: its own
            sopts = StainOptions(sampler=sampler, steps=steps, batch_size=o.inference_batch,
                                 device=o.device, seed=o.seed)
            ctx.timed(f"stain {name}", f"{slide_id}, a held-out phantom slide, whole slide",
                      lambda t=target, n=name: stain_slide(af, ctx.runs / n, t, sopts, progress=ctx.progress))
        res.files[f"stained {name}"] = target


def _uncertainty(ctx: DemoContext) -> None:
    """Calibrated interval maps of the held-out slide."""
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    o, unc = ctx.o, ctx.out / "uncertainty"
    slide_id, af, he = _heldout_pair(ctx.out / "heldout", o, ctx.progress)
    if not unc.exists():
        uopts = UncertaintyOptions(sampler=o.sampler, steps=o.sample_steps, batch_size=o.inference_batch,
                                   device=o.device, seed=o.seed, samples=o.samples)
        ctx.timed("uncertainty", f"{slide_id}, {o.samples} samples per pixel",
                  lambda: uncertainty_slide(af, ctx.runs / "diffusion", unc, uopts, reference=he,
                                            progress=ctx.progress))
    ctx.res.files["uncertainty"] = unc
    unc_iv = ctx.out / "uncertainty-intervals"
    if not unc_iv.exists():
        iopts = UncertaintyOptions(batch_size=o.inference_batch, device=o.device, seed=o.seed)
        ctx.timed("uncertainty intervals", f"{slide_id}, {INTERVAL_RUN}: one network call per window",
                  lambda: uncertainty_slide(af, ctx.runs / INTERVAL_RUN, unc_iv, iopts, reference=he,
                                            progress=ctx.progress))
    ctx.res.files["uncertainty intervals"] = unc_iv


def _score(ctx: DemoContext) -> None:
    """Every model on the same test tiles and seeds; report.html."""
    from vstain_cli.score.pipeline import EvaluateOptions, evaluate

    o, res, score_dir = ctx.o, ctx.res, ctx.out / "score"
    models = [*MODELS, *DISTILLED]
    done = score_dir / "score.json"
    # a score made before the distill stage existed lacks the distilled runs: scored again, all together
    stale = done.exists() and set(models) - set(json.loads(done.read_text()).get("models", {}))
    if not done.exists() or stale:
        notes = [*_training_notes(res.training), *interval_notes(ctx)]
        if res.calibration_source:
            notes.append(f"Calibration: {res.calibration_source}.")
        if res.bundled:
            notes.append(f"Models: the bundled runs; the phantom (seed {o.data_seed}) is "
                         + ("new to them: none of its slides was seen in training or model selection."
                            if res.fresh_phantom else "the one they were trained on; its test slides were held out."))
        eopts = EvaluateOptions(models=[ctx.runs / m for m in models], data=ctx.dataset,
                                stainnet=ctx.runs / "stainnet", inception_weights=o.inception_weights,
                                n=o.score_tiles, seed=o.seed, sampler=o.sampler, steps=o.sample_steps,
                                batch_size=o.inference_batch, device=o.device, out_dir=score_dir,
                                uncertainty_samples=o.samples, notes=notes, force=bool(stale),
                                # each distilled run samples as it was distilled: DDIM (eta 0) over its K steps
                                model_sampling=dict.fromkeys(DISTILLED, ("ddim", None, 0.0)))
        ctx.timed("score", f"{o.score_tiles} test tiles, same tiles and seeds for every model",
                  lambda: evaluate(eopts, ctx.progress))
    res.score = json.loads(done.read_text())
    res.files["report"] = score_dir / "report.html"
    res.comparison = cost_comparison(ctx)


# The demo's stages, in order (see the module docstring to add one).
STAGES: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("data", _data),
    ("models", _models),
    ("distill", _distill),
    ("calibrate", _calibrate),
    ("stain", _stain),
    ("uncertainty", _uncertainty),
    ("score", _score),
]


def run_demo(
    out: str | Path,
    options: DemoOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    stage: Stage | None = None,
) -> DemoResult:
    """Run every stage of ``STAGES`` on phantom data into ``out``."""
    o = options or DemoOptions()
    o.check()
    progress = progress or NullProgress()
    stage = stage or (lambda name, detail: None)
    out = Path(out)
    if force and out.exists():
        FolderOutput(out, force=True, marker="demo.json").check()  # --force deletes an earlier demo only
        shutil.rmtree(out)
    ensure_writable_dir(out)
    res = DemoResult(out)
    config = {"demo": {**asdict(o), "inception_weights": str(o.inception_weights)}}
    stages = read_stage_log(out)

    def save() -> None:
        write_json(out / "demo.json", {**record(config), "seconds": res.seconds, "bundled": res.bundled,
                                       "fresh_phantom": res.fresh_phantom, "phantom_seed": o.data_seed,
                                       "calibration_source": res.calibration_source, "training": res.training,
                                       "comparison": res.comparison, "stages": stages})

    def timed(name: str, detail: str, fn: Callable[[], Any]) -> Any:
        stage(name, detail)
        t = time.perf_counter()
        # logged before it runs: a step killed outright stays "completed": false (and its rerun is a resume)
        attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0, "completed": False}
        stages.setdefault(name, []).append(attempt)
        save()
        try:
            value = fn()
            attempt["completed"] = True
            return value
        finally:  # interrupted (Ctrl-C, SIGTERM, an error) or done: its wall time so far
            res.seconds[name] = attempt["seconds"] = time.perf_counter() - t
            save()

    save()
    ctx = DemoContext(o, out, progress, res, timed)
    for _, fn in STAGES:
        fn(ctx)
    # how this run went: its stage timings and where the models came from (bench/demo_figures.py --from)
    save()
    return res


def read_stage_log(out: Path) -> dict[str, list[dict]]:
    """demo.json's ``stages``: per step, every attempt (started, seconds, completed) of every invocation."""
    try:
        stages = json.loads((Path(out) / "demo.json").read_text()).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def stage_summary(stages: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Per logged step, in order: wall seconds summed over its attempts, whether it completed, and its
    resumes (when each attempt that followed an unfinished one started; a rerun that finds the step done
    is not a resume). A step killed outright (kill -9) counts 0 s for that attempt."""
    rows = []
    for name, attempts in stages.items():
        resumes = [a["started"] for prev, a in zip(attempts, attempts[1:]) if not prev["completed"]]
        rows.append({"stage": name, "seconds": round(sum(a["seconds"] for a in attempts), 3),
                     "completed": bool(attempts and attempts[-1]["completed"]), "resumes": resumes})
    return rows


def export_bundle(res: DemoResult, options: DemoOptions, dest: Path, command: str) -> Path:
    """Write the demo's runs as bundled runs into ``dest`` (``models/runs``) with ``bundle.json``.

    Everything in bundle.json comes from the demo folder: the recipe, the step log
    (wall seconds and resumes per step), each run's training budget, best step and
    resumes (its metrics.jsonl ships too; a distilled run's K, phases and teacher),
    the dataset's split sizes and tiler fingerprint, the scores, the calibrations
    (diffusion and the interval run), the distilled and interval runs against the
    full sampler (``comparison``) and StainNet's check.
    """
    from vstain_cli.data.synth.version import PHANTOM_VERSION
    from vstain_cli.infer.bundled import BUNDLE_FILE, BUNDLE_FORMAT, BUNDLED, phantom_fingerprint, publish_run_copy

    if res.bundled:
        raise InputError("--export-bundle needs --retrain (these runs came from the bundle)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, bundled in BUNDLED.items():
        publish_run_copy(res.out / "runs" / name, dest / bundled)
    dataset = res.out / "dataset"
    scores = {m: dict(r["metrics"]) for m, r in (res.score or {}).get("models", {}).items()}
    runs = {name: {"bundled": bundled, **train_summary(res.out / "runs" / name)} for name, bundled in BUNDLED.items()}
    manifest = {"format": BUNDLE_FORMAT, "format_version": 2, "command": command,
                "recipe": options.recipe(), "phantom_seed": options.data_seed, "phantom_version": PHANTOM_VERSION,
                "phantom_fingerprint": phantom_fingerprint(),
                "dataset": {"splits": split_sizes(dataset), "index_sha256": tiler_fingerprint(dataset),
                            "tile": {"size": options.tile, "stride": options.tile, "min_tissue": TILE_MIN_TISSUE}},
                "stages": stage_summary(read_stage_log(res.out)), "runs": runs,
                "scores": scores, "calibration": res.calibration, "interval_calibration": res.interval_calibration,
                "comparison": res.comparison, "stainnet": (res.score or {}).get("stainnet"),
                "provenance": record({"demo": options.recipe()})}
    write_json(dest / BUNDLE_FILE, manifest)
    return dest / BUNDLE_FILE
