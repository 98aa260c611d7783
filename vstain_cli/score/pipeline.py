"""``vstain score`` end to end, callable from Python: ``evaluate(EvaluateOptions(...))``.

Loads the real and stained image sets (or stains the AF of a dataset split with
trained runs), pairs them by tile name, computes FID / FSD / L1 / L2 / PSNR /
SSIM with bootstrap intervals (``vstain_cli.score.scoring``), and writes score.json,
per_image.csv, report.html (``vstain_cli.score.report``) and samples-NAME.npy per run.

FSD is only as good as the StainNet it uses: ``stainnet_check`` reads the run's
last validation accuracy (metrics.jsonl) and score.json's ``stainnet`` records it
with chance (1 / n_classes); at or below chance it is a warning (score.json and
the report).

Every sampled number carries its sampling protocol (``protocol``, sampler,
effective steps and eta: ``models[NAME]["sampling"]`` in score.json, a column of
the report); ``protocol="paper"`` samples with DDPM over the model's T steps.

For a diffusion run with a ``RUN/calibration.json`` the report gets a Fig. 3-style
uncertainty panel (Sridhar et al. 2023): ``uncertainty_samples`` draws (default:
the calibration's own count) for the first ``uncertainty_rows`` example tiles,
the calibrated 5-95 % interval in the calibration's form
(``vstain_cli.uq.intervals``), and the coverage of the real tiles by it. A
calibration made with another sampler, step count, eta or sample count than the
panel's is warned about loudly (a warning in score.json and the report).
No typer/rich here: progress flows through ``Progress``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vstain_cli import provenance, seeding
from vstain_cli.errors import InputError
from vstain_cli.infer.bundled import bundled_path
from vstain_cli.progress import NullProgress, Progress, WarningLog
from vstain_cli.runtime import resolve_device
from vstain_cli.score import scoring
from vstain_cli.score.scoring import ImageSet
from vstain_cli.train.run_folder import CALIBRATION_FILE, CONFIG

NO_CALIBRATION = "uncertainty panel skipped: no calibration.json (run `vstain calibrate`)"


@dataclass
class EvaluateOptions:
    """Everything ``vstain score`` takes; paths may be str or Path."""

    real: Path | None = None
    fakes: list[Path] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)
    data: Path | None = None
    names: list[str] | None = None
    stainnet: Path | None = None
    inception_weights: Path | None = None
    n: int | None = None
    seed: int = 0
    split: str = "test"
    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    protocol: str = "fast"
    n_boot: int = 1000
    fd_boot: int = 100
    unpaired: bool = False
    batch_size: int = 64
    device: str = "auto"
    grid_rows: int = 6
    out_dir: Path | None = None
    force: bool = False
    uncertainty_samples: int | None = None  # None: the calibration's own sample count
    uncertainty_rows: int = 3
    #: Score regression + N(0, 16) as a pseudo-model next to diffusion (needs both, and a StainNet).
    noise_check: bool = True
    #: Lines the caller adds to the report's notes (e.g. the demo: each model's training steps).
    notes: list[str] = field(default_factory=list)
    #: Model name -> (sampler, steps, eta) it samples with instead of the options' own (e.g. the demo's
    #: distilled runs: DDIM over their K steps next to the teacher's DPM-Solver++ 10).
    model_sampling: dict[str, tuple[str, int | None, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        opt = lambda p: None if p is None else Path(p)  # noqa: E731
        self.real, self.data = opt(self.real), opt(self.data)
        self.stainnet, self.inception_weights, self.out_dir = (
            opt(self.stainnet), opt(self.inception_weights), opt(self.out_dir))
        self.fakes = [Path(p) for p in self.fakes or []]
        self.models = [Path(p) for p in self.models or []]
        self.names = list(self.names) if self.names else None
        # bundled runs by name (phantom-diffusion, ...) wherever a run folder is accepted
        self.models = [bundled_path(m) or m for m in self.models]
        if self.stainnet is not None:
            self.stainnet = bundled_path(self.stainnet) or self.stainnet



@dataclass
class EvaluateResult:
    """What ``evaluate`` computed and wrote."""

    #: The content of score.json: n_real, tile_size, models, warnings, settings,
    #: notes, provenance, tiles (and ``uncertainty`` when a panel was drawn,
    #: ``stainnet`` (``stainnet_check``) with a StainNet run). With slide ids (a
    #: dataset): ``settings.intervals == "slides"``, ``slides`` (the per-slide table),
    #: per model ``grade`` (grade agreement, with a StainNet); ``noise_check`` when a
    #: regression and a diffusion model were scored with a StainNet. Each model has
    #: ``intervals`` ("slides"/"tiles") and, for --model runs, ``kind``.
    results: dict[str, Any]
    #: Output name ("score.json", "report.html", "per_image.csv", "samples-NAME.npy") -> path.
    paths: dict[str, Path]
    #: Informational lines (skipped metrics, skipped uncertainty panels).
    notes: list[str]
    #: Every warning emitted on the way (pairing, too few tiles for FD, ...).
    warnings: list[str]
    #: Per-tile distortion metrics: model -> metric -> (N,) array (as per_image.csv).
    per_image: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def model_names(sources: list[Path], names: list[str] | None) -> list[str]:
    """One display name per --fake/--model source (given, else the file/folder name)."""
    if names:
        if len(names) != len(sources):
            raise InputError(
                f"{len(names)} --name for {len(sources)} --fake/--model; give one name per "
                "--fake then per --model (or none)"
            )
        chosen = list(names)
    else:
        chosen = [p.stem if p.suffix.lower() == ".npy" else p.name for p in sources]
    seen: dict[str, int] = {}
    for i, n in enumerate(chosen):  # make duplicates unique: runs/A/out, runs/B/out -> out, out-2
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            chosen[i] = f"{n}-{seen[n]}"
    return chosen


def grid_pick(n_tiles: int, rows: int, seed: int) -> np.ndarray:
    """Sorted indices of the report's example tiles (seeded, independent of the subset seed)."""
    k = min(rows, n_tiles)
    return np.sort(seeding.numpy_rng(seed + 1).choice(n_tiles, size=k, replace=False))


def grid_columns(real_set: ImageSet, fake_sets: dict[str, ImageSet], paired: dict[str, bool], pick: np.ndarray,
                 af_set: ImageSet | None = None) -> dict[str, np.ndarray]:
    """Fig. 2-style columns: AF false colour (dataset input) | target | each model."""
    from vstain_cli.io import images as viz

    k = len(pick)
    rows = [int(i) for i in pick]
    cols: dict[str, np.ndarray] = {}
    af_set = af_set if af_set is not None and af_set.af is not None else real_set
    if af_set.af is not None:
        cols["AF (false colour)"] = viz.af_false_colour(af_set.af_norm(rows))
    cols["target H&E"] = real_set.images[pick]
    for name, fs in fake_sets.items():
        if paired[name]:
            cols[name] = fs.images[pick]
        else:
            cols[f"{name} (unpaired)"] = fs.images[:k]
    return cols


def draw_samples(run: Any, af: np.ndarray, count: int, *, sampler: str = "ddim", steps: int | None = None,
                 eta: float = 0.0, seed: int = 0, progress: Progress | None = None,
                 key: str = "uncertainty") -> np.ndarray:
    """``count`` diffusion samples of raw AF tiles (k, C, H, W) -> float32 (count, k, 3, H, W) in [-1, 1].

    Sample ``s`` draws from a generator seeded by (seed, s), so the panel is
    reproducible and independent of the batches used for scoring.
    """
    import torch

    progress = progress or NullProgress()
    x = torch.from_numpy(run.normalize(af)).to(run.device)
    out = np.empty((count, len(af), 3, *af.shape[-2:]), np.float32)
    progress.start(key, f"uncertainty samples {run.path.name}", count)
    for s in range(count):
        g = seeding.torch_generator(seeding.derive_seed(seed, seeding.SCORE_SAMPLES, s), run.device)
        try:
            y = run.translate(x, sampler=sampler, steps=steps, eta=eta, generator=g)
        except ValueError as e:  # e.g. steps > T
            raise InputError(f"{run.path}: {e}") from None
        out[s] = y.float().cpu().numpy()
        progress.advance(key)
    progress.finish(key)
    return out


def interval_panel(samples: np.ndarray, real: np.ndarray, calibration: Any, name: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Samples (S, k, 3, H, W) in [-1, 1] and real uint8 tiles (k, 3, H, W) -> panel columns, record.

    Columns: ``NAME mean``, ``NAME lower``, ``NAME upper`` as uint8 RGB and
    ``NAME width`` as (k, H, W) float (upper - lower within [0, 255], RGB mean). The
    interval is the per-pixel ``q_low``-``q_high`` sample interval with the
    calibrated lambda in the calibration's form (``intervals.credible_interval``);
    the record holds the coverage of the real tiles by it (all and per tile).
    """
    from vstain_cli.data.store import he_to_unit, unit_to_he
    from vstain_cli.uq.intervals import credible_interval, pixel_risk

    cal = calibration
    iv = credible_interval(samples, cal.lam, cal.q_low, cal.q_high, cal.interval)
    target = he_to_unit(np.asarray(real))
    risk = np.atleast_1d(pixel_risk(target, iv.lower, iv.upper))
    # widths of the interval within the displayable range [-1, 1], in 0-255 units
    width = (np.clip(iv.upper, -1.0, 1.0) - np.clip(iv.lower, -1.0, 1.0)).mean(axis=1) * 127.5
    cols = {
        f"{name} mean": unit_to_he(iv.mean),
        f"{name} lower": unit_to_he(iv.lower),
        f"{name} upper": unit_to_he(iv.upper),
        f"{name} width": width,
    }
    record = {
        "lam": float(cal.lam), "interval": cal.interval, "q_low": float(cal.q_low), "q_high": float(cal.q_high),
        "alpha": float(cal.alpha), "nominal_coverage": 1.0 - float(cal.alpha),
        "samples": int(samples.shape[0]), "n": int(len(risk)),
        "coverage": float(1.0 - risk.mean()),
        "coverage_per_tile": [float(1.0 - r) for r in risk],
        "mean_width_255": float(width.mean()),
    }
    return cols, record


def _load_calibration(run_dir: Path) -> Any:
    """``CalibrationFile`` of ``run_dir/calibration.json``, None when absent; InputError when corrupt."""
    from vstain_cli.uq.compat import CalibrationFile

    path = run_dir / CALIBRATION_FILE
    if not path.exists():
        return None
    return CalibrationFile.read(path)


def _calibration_mismatch(name: str, found: Any, sampling: dict[str, Any], samples: int, run: Any) -> str | None:
    """A warning when the calibration was made with other settings than the panel uses."""
    from vstain_cli.uq.compat import mismatches

    now = {"sampler": sampling["sampler"], "steps": sampling["steps"], "eta": sampling["eta"], "samples": samples}
    diff = mismatches(found.sampling(), now)
    made_step = found.meta.get("model_step")
    if made_step is not None and made_step != run.step:
        diff.append(f"model_step {made_step} -> {run.step}")
    if not diff:
        return None
    return (f"{name}: calibration.json was made differently ({', '.join(diff)}): its lambda does not hold for "
            "this panel, whose coverage is not calibrated; score with the calibration's settings or recalibrate")


def run_sampling(run_dir: Path, protocol: str, sampler: str, steps: int | None, eta: float
                 ) -> tuple[tuple[str, int | None, float], dict[str, Any] | None]:
    """((sampler, steps, eta) to run, protocol record) for a run folder; the record is None unless it samples.

    T comes from the run's config.json (a distilled run's: its K-step grid); a config
    that cannot be read gives None here and its one-line error when the run is loaded.
    """
    import json

    from vstain_cli.diffusion.samplers import protocol_record, resolve_protocol
    from vstain_cli.train.presets import Preset

    try:
        resolved = resolve_protocol(protocol, sampler, steps, eta)
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        cfg = json.loads((run_dir / CONFIG).read_text())
        preset = Preset.from_dict(cfg["preset"])
        distill = cfg.get("distill") if isinstance(cfg.get("distill"), dict) else {}
        T = len(distill["timesteps"]) if distill.get("timesteps") else preset.diffusion.timesteps
    except Exception:  # noqa: BLE001 - reported by load_run with the file's name
        return resolved, None
    if preset.kind != "diffusion" or cfg.get("kind", preset.kind) != "diffusion":  # e.g. an interval run
        return resolved, None
    return resolved, protocol_record(protocol, *resolved, T)


def _sampling_of(o: EvaluateOptions, name: str) -> tuple[str, int | None, float]:
    """(sampler, steps, eta) model ``name`` samples with: its ``model_sampling`` entry, else the options'."""
    return o.model_sampling.get(name, (o.sampler, o.steps, o.eta))


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's config.json as a dict; None when unreadable (load_run reports it with the file's name)."""
    import json

    try:
        cfg = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def stainnet_check(run_dir: str | Path) -> dict[str, Any]:
    """A StainNet run's last validation accuracy against chance (1 / n_classes).

    From RUN/metrics.jsonl (the ``split: "val"`` records ``vstain train`` writes, the
    latest step) and config.json's n_classes. Returns {"run", "val_accuracy",
    "val_step", "n_classes", "chance", "at_chance"}; ``at_chance`` is True when the
    accuracy is at or below chance, None when the run logged no validation accuracy.
    """
    import json

    from vstain_cli.train import run_folder

    run_dir = Path(run_dir)
    n_classes = None
    try:
        cfg = json.loads((run_dir / run_folder.CONFIG).read_text())
        n_classes = int(cfg["preset"]["stainnet"]["n_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an unreadable run is reported by load_run with the file's name
    try:
        records = run_folder.read_metrics(run_dir)
    except (OSError, ValueError):
        records = []
    vals = [r for r in records if isinstance(r, dict) and r.get("split") == "val" and r.get("accuracy") is not None]
    last = max(reversed(vals), key=lambda r: r.get("step", 0)) if vals else None  # latest step, last logged
    acc = None if last is None else float(last["accuracy"])
    chance = None if not n_classes else 1.0 / n_classes
    at_chance = None if acc is None or chance is None else bool(acc <= chance + 1e-9)
    return {"run": str(run_dir), "val_accuracy": acc, "val_step": None if last is None else last.get("step"),
            "n_classes": n_classes, "chance": chance, "at_chance": at_chance}


def stainnet_warning(rec: dict[str, Any]) -> str | None:
    """The warning for a ``stainnet_check`` record at or below chance (None otherwise)."""
    if not rec.get("at_chance"):
        return None
    if rec.get("test"):
        t = rec["test"]
        return (f"StainNet {Path(rec['run']).name}: accuracy {t['accuracy']:.3f} on the {t['patches']} scored real "
                f"{t['split']} tiles is at or below chance ({t['chance']:.3f} = 1/{rec['n_classes']}): its features "
                "need not tell stains apart, so FSD means little; train it longer, or re-tile so that every split "
                "holds every label")
    return (f"StainNet {Path(rec['run']).name}: validation accuracy {rec['val_accuracy']:.3f} (step "
            f"{rec['val_step']}) is at or below chance ({rec['chance']:.3f} = 1/{rec['n_classes']}): its features "
            "need not tell stains apart, so FSD means little; train it longer, or re-tile so that every split "
            "holds every label")


def _check(o: EvaluateOptions) -> tuple[Path, Path | None, list[str]]:
    """Validate the options before any work; returns (real, data, names)."""
    fakes, models = o.fakes, o.models
    real, data = o.real, o.data
    if not fakes and not models:
        raise InputError("give at least one --fake image set or --model run to score")
    if real is None and data is None:
        raise InputError("give the real tiles with --real (or a dataset with --data)")
    if models and data is None:
        if real is not None and (real / "dataset.json").is_file():
            data = real
        else:
            raise InputError("--model needs the dataset whose AF it stains: give --data dataset/")
    real = real if real is not None else data
    names = model_names(fakes + models, o.names)
    for p in [real, *fakes, *([data] if data else [])]:
        if not p.exists():
            raise InputError("image set not found (a folder of tiles, a .npy array or a dataset folder)", p)
    for p in models:
        if not p.is_dir():
            raise InputError("run folder not found (train one with `vstain train`)", p)
    if o.inception_weights is not None and not o.inception_weights.is_file():
        raise InputError("Inception weights file not found (FID needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth)", o.inception_weights)
    if o.stainnet is not None and not o.stainnet.is_dir():
        raise InputError("StainNet run folder not found (train one with `vstain train --preset stainnet`)", o.stainnet)
    if models:
        from vstain_cli.diffusion.samplers import SAMPLERS, resolve_protocol

        if o.sampler not in SAMPLERS:
            raise InputError(f"unknown --sampler {o.sampler!r} (choose from {', '.join(SAMPLERS)})")
        try:
            resolve_protocol(o.protocol, o.sampler, o.steps, o.eta)
        except ValueError as e:
            raise InputError(str(e)) from None
    unknown = sorted(set(o.model_sampling) - set(names[len(fakes):]))
    if unknown:
        raise InputError(f"model_sampling names no scored model: {', '.join(unknown)}")
    if o.out_dir is None:
        raise InputError("give an output folder (--out)")
    if o.uncertainty_rows < 0:
        raise InputError(f"uncertainty_rows must be at least 0, got {o.uncertainty_rows}")
    if o.uncertainty_samples is not None and o.uncertainty_samples < 2:
        raise InputError(f"uncertainty_samples must be at least 2 (quantiles need a spread), got {o.uncertainty_samples}")
    return real, data, names


def evaluate(options: EvaluateOptions, progress: Progress | None = None) -> EvaluateResult:
    """Score stained tiles against real H&E and write score.json, per_image.csv, report.html.

    InputError (one line, naming the file) for bad input, OutputExistsError when an
    output exists and ``options.force`` is false; both before any heavy work.
    """
    o = options
    prog = WarningLog(progress or NullProgress())
    real, data, names = _check(o)
    fakes, models, split, seed = o.fakes, o.models, o.split, o.seed
    model_names_ = names[len(fakes):]
    configs = {nm: run_config(p) for nm, p in zip(model_names_, models)}
    if models:
        _check_channels(data, split, models, model_names_, configs)
    outputs = ["score.json", "report.html", "per_image.csv"] + [f"samples-{nm}.npy" for nm in model_names_]
    paths = {k: o.out_dir / k for k in outputs}
    for p in paths.values():
        provenance.check_output_file(p, o.force, inputs=[real, *fakes])
    show_panel = o.grid_rows > 0 and o.uncertainty_rows > 0
    calibrations = {nm: _load_calibration(p) for nm, p in zip(model_names_, models)} if show_panel else {}

    dev = str(resolve_device(o.device)) if (o.inception_weights or o.stainnet or models) else "cpu"
    notes: list[str] = list(o.notes)
    extractors = {}
    if o.inception_weights is not None:
        extractors["FID"] = scoring.inception_extractor(o.inception_weights, dev)
    else:
        notes.append("FID skipped: no --inception-weights file given")
    stainnet_rec, first_warnings, net = None, [], None
    if o.stainnet is not None:
        net = scoring.StainNetScorer(o.stainnet, dev)
        extractors["FSD"] = net.features
        stainnet_rec = stainnet_check(o.stainnet)
    else:
        notes.append("FSD skipped: no --stainnet run given (PFD, grade agreement and the noise check need it too)")
    real_full = scoring.load_images(real, split, prog)
    idx = scoring.select_tiles(len(real_full), o.n, seed)
    if o.n is not None and o.n > len(real_full):
        too_many = f"--n {o.n} is more than the {len(real_full)} real tiles: scoring all {len(real_full)}"
        prog.warn(too_many)
        first_warnings.append(too_many)
    real_set = real_full.take(idx)
    slides = _slides_of(real, data, real_full, split, real_set.names, prog)
    groups, labels = slides if slides is not None else (None, None)
    if groups is None:
        notes.append("intervals are tile-level: the real tiles' slides are unknown (a folder or array, not a "
                     "dataset), so tiles are resampled as if independent; give a dataset for slide-level intervals")
    real_feats, real_pred = {}, None
    if net is not None:
        real_feats["FSD"] = scoring.extract_features(real_set.images, net.features, o.batch_size, prog, "FSD real")
        real_pred = net.predict(real_feats["FSD"])
    if stainnet_rec is not None:
        if labels is not None:  # the paper's task on the scored real tiles: slide label from a patch
            stainnet_rec["test"] = {"split": split, **scoring.accuracy_record(labels, real_pred, net.n_classes)}
            # the scored tiles (every label of the split, many tiles) are better evidence than the
            # run's last validation batches: they decide whether StainNet is at chance
            t = stainnet_rec["test"]
            stainnet_rec["at_chance"] = bool(t["accuracy"] <= t["chance"] + 1e-9)
        chance_warning = stainnet_warning(stainnet_rec)
        if chance_warning:
            prog.warn(chance_warning)
            first_warnings.append(chance_warning)
        elif stainnet_rec["at_chance"] is None:
            notes.append(f"StainNet {o.stainnet.name}: no validation accuracy in its metrics.jsonl, so whether "
                         "its features (and FSD) mean anything is unchecked")
    fake_sets: dict[str, ImageSet] = {}
    paired: dict[str, bool] = {}
    for nm, p in zip(names, fakes):
        fs = scoring.load_images(p, split, prog)
        ok = False
        if not o.unpaired:
            fs, ok = scoring.pair_with_real(real_full, fs, prog)
        fake_sets[nm] = fs.take(idx) if ok else fs.take(scoring.select_tiles(len(fs), o.n, seed))
        paired[nm] = ok
    src = real_set
    sampling: dict[str, dict[str, Any] | None] = {}
    if models:
        if Path(data).resolve() != Path(real).resolve():
            data_full = scoring.load_images(data, split, prog)
            if data_full.names != real_full.names:
                raise InputError(
                    f"--real tiles are not named like --data's {split} tiles (slide_row); "
                    "omit --real to score against --data",
                    real,
                )
            src = data_full.take(idx)
        for nm, run_dir in zip(model_names_, models):
            (sampler, steps, eta), sampling[nm] = run_sampling(run_dir, o.protocol, *_sampling_of(o, nm))
            tiles = scoring.sample_run_tiles(run_dir, src, dev, sampler, steps, eta, seed, o.batch_size, prog)
            with provenance.atomic_output(paths[f"samples-{nm}.npy"]) as tmp, open(tmp, "wb") as f:
                np.save(f, tiles)
            fake_sets[nm] = ImageSet(tiles, list(real_set.names), str(run_dir))
            paired[nm] = True
    fd_device = dev if dev.startswith("cuda") else None
    results = scoring.score_image_sets(
        real_set.images,
        {k: v.images for k, v in fake_sets.items()},
        extractors,
        n_boot=o.n_boot,
        seed=seed,
        fd_boot=o.fd_boot,
        paired=paired,
        batch_size=o.batch_size,
        progress=prog,
        fd_device=fd_device,
        groups=groups,
        real_features=real_feats,
        return_features=True,
    )
    per_image = results.pop("per_image")
    features = results.pop("features")
    for nm, rec in sampling.items():  # every sampled number says how it was sampled
        results["models"][nm]["sampling"] = rec
    for nm, cfg in configs.items():  # the kind of model decides its role in Table 1 and the noise check
        kind = ((cfg or {}).get("preset") or {}).get("kind")
        if kind:
            results["models"][nm]["kind"] = kind
    fake_pred = {nm: net.predict(features["FSD"][nm]) for nm in per_image} if net is not None else {}
    if groups is not None:
        if labels is not None and net is not None:
            from vstain_cli.score.slides import grade_agreement

            for nm in per_image:
                results["models"][nm]["grade"] = grade_agreement(labels, groups, real_pred, fake_pred[nm],
                                                                 net.n_classes, o.n_boot, seed)
        from vstain_cli.score.slides import per_slide_table

        results["slides"] = per_slide_table(groups, labels, per_image, features, real_pred, fake_pred,
                                            None if net is None else net.n_classes)
    if o.noise_check:
        check = _noise_check(results, fake_sets, real_set, net, real_feats, groups, o, prog, fd_device, notes)
        if check is not None:
            results["noise_check"] = check

    grids, row_names, panel = None, None, {}
    pick = grid_pick(len(real_set), o.grid_rows, seed) if o.grid_rows > 0 else np.zeros(0, int)
    if o.grid_rows > 0:
        grids = grid_columns(real_set, fake_sets, paired, pick, src)
        row_names = [real_set.names[i] for i in pick]
    unc_records: dict[str, Any] = {}
    if show_panel and models:
        panel, unc_records = _uncertainty(o, models, model_names_, calibrations, src, real_set,
                                          pick[: o.uncertainty_rows], dev, notes, prog, sampling)
        results["warnings"] = list(results.get("warnings", [])) + [
            w for w in prog.warnings if "calibration.json was made differently" in w]

    results["warnings"] = first_warnings + [w for w in results.get("warnings", []) if w not in first_warnings]
    if stainnet_rec is not None:
        results["stainnet"] = stainnet_rec
    results["notes"] = notes
    if unc_records:
        results["uncertainty"] = unc_records
    config = {
        "real": str(real), "fake": [str(p) for p in fakes], "model": [str(p) for p in models],
        "data": str(data) if data else None, "names": names,
        "stainnet": str(o.stainnet) if o.stainnet else None,
        "inception_weights": str(o.inception_weights) if o.inception_weights else None, "n": o.n, "seed": seed,
        "split": split, "protocol": o.protocol, "sampler": o.sampler, "steps": o.steps, "eta": o.eta,
        "sampling": sampling, "n_boot": o.n_boot,
        "fd_boot": o.fd_boot, "unpaired": o.unpaired, "device": dev,
        "uncertainty_samples": o.uncertainty_samples, "uncertainty_rows": o.uncertainty_rows,
        "noise_check": o.noise_check,
    }
    inputs = {"inception_weights": provenance.fingerprint(o.inception_weights)} if o.inception_weights else {}
    results["provenance"] = provenance.record(config, inputs)
    doc = scoring.json_ready({**results, "tiles": real_set.names})
    provenance.write_json(paths["score.json"], doc)
    scoring.write_per_image_csv(paths["per_image.csv"], {"per_image": per_image}, real_set.names)
    from vstain_cli.score.report import write_report

    write_report(paths["report.html"], results, grids, panel or None, row_names=row_names)
    return EvaluateResult(doc, paths, notes, prog.warnings, per_image)


def _check_channels(data: Path, split: str, models: list[Path], names: list[str],
                    configs: dict[str, dict[str, Any] | None]) -> None:
    """Before any work: each run's AF channel count must be the dataset's (InputError naming both)."""
    from vstain_cli.data import store as ds

    info = ds.open_dataset(data)
    for nm, run_dir in zip(names, models):
        cfg = configs.get(nm) or {}
        if isinstance(cfg.get("channels"), int):
            scoring.check_channels(info.channels, cfg["channels"], f"{data}:{split}", run_dir)


def _slides_of(real: Path, data: Path | None, real_full: ImageSet, split: str, names: list[str],
               progress: Progress) -> tuple[list[str], np.ndarray] | None:
    """(slide id, label) per scored real tile when a dataset names them; None for folders and arrays."""
    found = scoring.dataset_slides(real, names)
    if found is not None or data is None or not (Path(data) / "dataset.json").is_file():
        return found
    from vstain_cli.data import store as ds

    keys = ds.open_dataset(data).patch_keys(split)
    if [f"{sl}_{r:06d}" for sl, r in keys] != real_full.names:
        progress.warn(f"--real tiles are not named like --data's {split} tiles (slide_row): their slides are "
                      "unknown, so intervals are tile-level")
        return None
    return scoring.dataset_slides(data, names)


def _noise_check(results: dict[str, Any], fake_sets: dict[str, ImageSet], real_set: ImageSet, net: Any,
                 real_feats: dict[str, np.ndarray], groups: list[str] | None, o: EvaluateOptions,
                 progress: Progress, fd_device: str | None, notes: list[str]) -> dict[str, Any] | None:
    """Score regression + N(0, 16) next to diffusion (``noise_check``); None (with a note) when it cannot run."""
    from vstain_cli.score import noise_check
    from vstain_cli.score.table1 import find_roles

    models = results["models"]
    roles = find_roles({k: v for k, v in models.items() if v.get("paired")})
    if "regression" not in roles or "diffusion" not in roles:
        return None  # nothing to check: the check compares a regression and a diffusion model
    if net is None:
        notes.append("noise check skipped: it needs FSD and PFD features (give --stainnet)")
        return None
    base, against = roles["regression"], roles["diffusion"]
    noisy = noise_check.noisy_tiles(fake_sets[base].images, noise_check.NOISE_SD, o.seed)
    name = f"{base} + N(0, {noise_check.NOISE_SD:g})"
    scored = scoring.score_image_sets(
        real_set.images, {name: noisy}, {"FSD": net.features}, n_boot=o.n_boot, seed=o.seed, fd_boot=o.fd_boot,
        paired={name: True}, batch_size=o.batch_size, progress=progress, fd_device=fd_device, groups=groups,
        real_features=real_feats)
    return {**noise_check.verdict(models, scored["models"][name], base, against, noise_check.NOISE_SD),
            "seed": o.seed, "seed_stream": "SCORE_NOISE"}


def _uncertainty(o: EvaluateOptions, models: list[Path], names: list[str], calibrations: dict[str, Any],
                 src: ImageSet, real_set: ImageSet, pick: np.ndarray, dev: str, notes: list[str],
                 progress: Progress, sampling: dict[str, dict[str, Any] | None]
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fig. 3-style columns (AF | target | per calibrated diffusion run: mean, lower, upper, width)."""
    from vstain_cli.infer.run import load_run
    from vstain_cli.io import images as viz

    rows = [int(i) for i in pick]
    cols: dict[str, np.ndarray] = {}
    records: dict[str, Any] = {}
    for nm, run_dir in zip(names, models):
        run = load_run(run_dir, dev)
        if not run.is_diffusion:
            continue  # deterministic: one output per input, no spread to show
        found = calibrations.get(nm)
        if found is None:
            notes.append(NO_CALIBRATION if len(models) == 1 else f"{nm}: {NO_CALIBRATION}")
            continue
        (sampler, steps, eta), rec = run_sampling(run_dir, o.protocol, *_sampling_of(o, nm))
        rec = rec or sampling.get(nm)
        count = o.uncertainty_samples or found.cal.samples or 8
        mismatch = _calibration_mismatch(nm, found, rec, count, run)
        if mismatch:
            progress.warn(mismatch)
        samples = draw_samples(run, src.af(rows), count, sampler=sampler, steps=steps,
                               eta=eta, seed=o.seed, progress=progress, key=f"uncertainty:{nm}")
        if not cols:
            if src.af is not None:
                cols["AF (false colour)"] = viz.af_false_colour(src.af_norm(rows))
            cols["target H&E"] = real_set.images[pick]
        panel, record = interval_panel(samples, real_set.images[pick], found.cal, nm)
        cols.update(panel)
        records[nm] = {"calibration": str(run_dir / CALIBRATION_FILE), **record, "sampling": rec,
                       "calibration_made_with": found.sampling(), "calibration_mismatch": mismatch,
                       "tiles": [real_set.names[i] for i in rows]}
    return cols, records


__all__ = ["EvaluateOptions", "EvaluateResult", "evaluate", "model_names", "grid_pick", "grid_columns",
           "draw_samples", "interval_panel", "run_sampling", "run_config", "stainnet_check", "stainnet_warning",
           "NO_CALIBRATION"]
