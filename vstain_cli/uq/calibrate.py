"""``vstain calibrate``: the interval scale lambda of a diffusion run, by RCPS.

Sridhar et al. 2023 scale the per-pixel 5-95 % sample interval by a factor lambda
calibrated on the validation split (lambda = 1.32 in the paper, in Conffusion's
multiplicative form, Horwitz & Hoshen 2022). Here lambda is calibrated in the
form ``interval`` asks for (multiplicative, the default, or centered as in
im2im-uq, Angelopoulos et al. 2022), by risk-controlling prediction sets (Bates
et al. 2021):

1. ``n`` tiles evenly spread over the calibration split (deterministic), ``samples``
   diffusion samples per tile with ``Run.translate`` (one seeded generator per
   batch and sample), per-pixel quantiles (``intervals.sample_quantiles``);
2. per tile, the risk (fraction of pixel-channel values of the real H&E outside
   the interval) at every lambda of the grid (``intervals.RiskTable``);
3. lambda_hat = the RCPS choice with the Hoeffding-Bentkus bound
   (``intervals.calibrate_lambda``): with probability >= 1 - delta, the expected
   risk on new tiles is <= alpha;
4. a held-out check on the test split at lambda_hat (``intervals.coverage_report``).

The same draws also give, by the same RCPS at the same alpha and delta:

* lambda of the other form (``forms``, for comparison; maps use ``interval``'s);
* the trivial baselines (``baselines``): a constant band [p - c, p + c] around the
  mean of the samples and, with ``baseline``, around a regression or pix2pix run's
  output, with c calibrated like lambda; whether the diffusion interval is
  narrower than the band at the same test coverage is recorded;
* intervals at structure scale (``scales``): lambda of the quantile interval of
  block means over ``s`` x ``s`` µm blocks, for each ``scales`` entry.

An interval run (``vstain distill --intervals``, Conffusion-style: lower and upper
bounds in one network call) is calibrated the same way with the interval source
"bounds" (``intervals.IntervalSource``): step 1 is one ``Run.interval`` call per
batch instead of N samples, lambda scales [lower, upper] around its midpoint
(centered by default: the width times lambda), the trivial band is centred on the
run's midpoint, and a structure scale calibrates the block means of the bounds.
calibration.json records ``source: "bounds"`` and no sampler, steps or samples.

The sampling protocol (sampler, effective steps and eta, ``--protocol``) and the
slides and grades used are recorded. The result is written atomically to
``RUN/calibration.json``, which ``vstain uncertainty`` picks up by default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstain_cli import seeding
from vstain_cli.data.loader import spread_indices
from vstain_cli.data.store import SPLITS, DatasetInfo, he_to_unit, open_dataset
from vstain_cli.diffusion.samplers import PROTOCOLS, SAMPLERS, protocol_record, resolve_protocol
from vstain_cli.errors import InputError
from vstain_cli.infer.bundled import bundle_root, bundled_path
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.infer.wholeslide import require_diffusion
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import check_output_file, fingerprint, record, write_json
from vstain_cli.train.run_folder import CALIBRATION_FILE, WEIGHTS
from vstain_cli.uq.intervals import (
    DEFAULT_FORM,
    DEFAULT_FORMS,
    DEFAULT_LAMBDA_MAX,
    FORMS,
    Calibration,
    IntervalSource,
    RiskTable,
    block_means,
    coverage_report,
    sample_quantiles,
)

WIDTH_UNIT = "0-255 RGB; mean per-pixel width of the interval clipped to 0-255"
LAMBDA_MAX_LIMIT = 100.0  # grid points (0.01 apart) x tiles x forms stay a few tens of MB
MIN_CALIBRATION_SLIDES = 4  # fewer slides (or missing grades) in the calibration split: a warning
BASELINE_KINDS = ("regression", "pix2pix")
BANDS = ("sample_mean", "baseline_run")  # what the trivial band is centred on (a diffusion run)
POINT_BAND = {"samples": "sample_mean", "bounds": "midpoint"}  # the band around the run's own point
INTERVAL_KIND = "interval"  # Run.kind of a one-pass interval run (`vstain distill --intervals`)

UNIT_TO_255 = 127.5  # [-1, 1] model space -> 0-255 RGB units (widths of intervals clipped to [-1, 1])


@dataclass
class CalibrateOptions:
    """How a run is calibrated; recorded in calibration.json."""

    split: str = "val"
    test_split: str | None = "test"
    samples: int = 20
    n: int = 200
    alpha: float = 0.1
    delta: float = 0.1
    q_low: float = 0.05
    q_high: float = 0.95
    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    protocol: str = "fast"
    interval: str | None = DEFAULT_FORM  # None: the source's default (multiplicative samples, centered bounds)
    lambda_max: float = DEFAULT_LAMBDA_MAX  # upper end of the lambda grid searched (0.00, 0.01, ..., lambda_max)
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    baseline: str | None = None       # regression / pix2pix run: the trivial band around its output
    scales: tuple[float, ...] = ()    # structure scales (µm) whose block means are calibrated too

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown --protocol {self.protocol!r} (choose from {', '.join(PROTOCOLS)})")
        if self.interval is not None and self.interval not in FORMS:
            raise InputError(f"unknown --interval {self.interval!r} (choose from {', '.join(FORMS)})")
        if self.samples < 2:
            raise InputError(f"--samples must be at least 2 (quantiles need a spread), got {self.samples}")
        if self.n < 1:
            raise InputError(f"--n must be at least 1, got {self.n}")
        for name in ("alpha", "delta"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InputError(f"--{name} must be in (0, 1), got {getattr(self, name)}")
        if not 1.0 <= self.lambda_max <= LAMBDA_MAX_LIMIT:
            raise InputError(f"--lambda-max must be between 1 and {LAMBDA_MAX_LIMIT:g}, got {self.lambda_max:g}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.steps is not None and not 1 <= self.steps <= 10_000:
            raise InputError(f"--steps must be between 1 and 10000, got {self.steps}")
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        for split in (self.split, self.test_split):
            if split is not None and split not in SPLITS:
                raise InputError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        for s in self.scales:
            if not (math.isfinite(s) and s > 0):
                raise InputError(f"--scale must be a positive length in µm, got {s:g}")
        if len(set(self.scales)) != len(self.scales):
            raise InputError(f"--scale given twice ({', '.join(f'{s:g}' for s in self.scales)})")


@dataclass
class CalibrateResult:
    """What ``calibrate_run`` wrote."""

    path: Path
    calibration: Calibration
    test: dict[str, Any] | None
    val_width: float        # mean raw (lambda = 1) interval width on the calibration tiles, clipped, 0-255
    seconds: float
    sampling: dict[str, Any] = field(default_factory=dict)  # protocol, sampler, steps, eta (effective)
    forms: dict[str, Any] = field(default_factory=dict)     # form -> lam, risk, ucb, test (or error)
    baselines: dict[str, Any] = field(default_factory=dict)  # BANDS name -> the trivial band's record
    scales: list[dict[str, Any]] = field(default_factory=list)  # one record per structure scale
    slides: dict[str, Any] = field(default_factory=dict)     # slides and grades of the splits used
    warnings: list[str] = field(default_factory=list)
    source: str = "samples"  # "samples" (a diffusion run) or "bounds" (a one-pass interval run)


@dataclass(frozen=True)
class Scale:
    """A structure scale: ``um`` µm asked for, ``block_px`` px blocks of ``block_um`` µm (at the tile mpp)."""

    um: float
    block_px: int
    block_um: float


def check_compatible(run: Run, info: DatasetInfo, *, diffusion: bool = True) -> None:
    """A run (with ``diffusion``: one that gives an interval, a diffusion or interval run) whose channels and
    tile size match the dataset."""
    if diffusion and run.kind != INTERVAL_KIND:
        require_diffusion(run)
    if info.channels != run.channels:
        raise InputError(f"dataset has {info.channels} AF channels but model {run.path.name} was trained on "
                         f"{run.channels}", info.root / "dataset.json")
    if info.tile_size != run.tile_size:
        raise InputError(f"dataset tiles are {info.tile_size} px but model {run.path.name} was trained on "
                         f"{run.tile_size} px tiles (calibrate on tiles of the training size)",
                         info.root / "dataset.json")


def resolve_scales(info: DatasetInfo, scales: tuple[float, ...]) -> list[Scale]:
    """Block sizes of the structure scales at the dataset's tile mpp (dataset.json ``mpp``)."""
    if not scales:
        return []
    where = info.root / "dataset.json"
    mpp = info.meta.get("mpp")
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise InputError("records no tile scale (mpp, µm/px), which --scale needs; re-tile with a known mpp",
                         where) from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"corrupt dataset.json (mpp {mpp} is not a positive µm/px)", where)
    out: list[Scale] = []
    for um in scales:
        px = int(round(um / mpp))
        if px < 1:
            raise InputError(f"--scale {um:g} µm is below one pixel at the tiles' {mpp:g} µm/px", where)
        if px > info.tile_size:
            raise InputError(f"--scale {um:g} µm is {px} px at {mpp:g} µm/px, larger than the "
                             f"{info.tile_size} px tiles", where)
        same = [s for s in out if s.block_px == px]
        if same:
            raise InputError(f"--scale {same[0].um:g} and {um:g} µm are both {px} px blocks at {mpp:g} µm/px",
                             where)
        out.append(Scale(float(um), px, px * mpp))
    return out


def chosen_keys(info: DatasetInfo, split: str, n: int) -> list[tuple[str, int]]:
    """The ``n`` patch keys of ``split`` that calibration uses: evenly spread, deterministic."""
    keys = info.patch_keys(split)
    return [keys[i] for i in spread_indices(len(keys), n)]


def split_slides(info: DatasetInfo, split: str, keys: list[tuple[str, int]]) -> dict[str, Any]:
    """Slides (with their tile counts) and slide grades (labels) of the tiles used from ``split``."""
    counts: dict[str, int] = {}
    for sid, _ in keys:
        counts[sid] = counts.get(sid, 0) + 1
    return {"split": split, "slides": counts, "grades": sorted({info.slides[s].label for s in counts})}


def coverage_warning(used: dict[str, Any], dataset_grades: list[int]) -> str | None:
    """One line when the calibration tiles come from fewer than 4 slides or miss a grade of the dataset."""
    n_slides, grades = len(used["slides"]), used["grades"]
    missing = sorted(set(dataset_grades) - set(grades))
    if n_slides >= MIN_CALIBRATION_SLIDES and not missing:
        return None
    why = []
    if n_slides < MIN_CALIBRATION_SLIDES:
        why.append(f"{n_slides} slide{'s' * (n_slides != 1)} (at least {MIN_CALIBRATION_SLIDES} wanted)")
    if missing:
        why.append(f"no slide of grade{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} (the dataset "
                   f"has {', '.join(map(str, dataset_grades))})")
    return (f"the {used['split']!r} split gives calibration tiles from {' and '.join(why)}: lambda may not hold "
            "on the missing kinds of tissue; assign more slides of every grade to it (pairs.csv's split column)")


def _batches(info: DatasetInfo, keys: list[tuple[str, int]], batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(af (B, C, S, S), he (B, 3, S, S)) batches of the given patch keys, in order."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for b in range(0, len(keys), batch_size):
        af, he = [], []
        for sid, row in keys[b:b + batch_size]:
            if sid not in cache:
                cache[sid] = info.arrays(sid)
            af.append(np.asarray(cache[sid][0][row]))
            he.append(np.asarray(cache[sid][1][row]))
        yield np.stack(af), np.stack(he)


def sample_batches(run: Run, info: DatasetInfo, keys: list[tuple[str, int]], options: CalibrateOptions, phase: int,
                   progress: Progress, label: str, baseline: Run | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per batch of ``keys``: (target, draws (samples, B, 3, S, S), baseline output or None), in [-1, 1].

    Sample k of batch b draws its noise from a CPU generator seeded by
    (seed, phase, b, k): the same numbers on any device.
    """
    progress.start(label, f"{label}: {len(keys)} tiles x {options.samples} samples", len(keys) * options.samples)
    for b, (af, he) in enumerate(_batches(info, keys, options.batch_size)):
        x = torch.from_numpy(run.normalize(af))
        draws = np.empty((options.samples, len(af), 3, *af.shape[-2:]), np.float32)
        for k in range(options.samples):
            g = seeding.torch_generator(seeding.derive_seed(options.seed, seeding.CALIBRATE, phase, b, k))  # CPU
            draws[k] = run.translate(x, sampler=options.sampler, steps=options.steps, eta=options.eta,
                                     generator=g).float().cpu().numpy()
            progress.advance(label, len(af))
        point = None
        if baseline is not None:
            point = baseline.translate(torch.from_numpy(baseline.normalize(af))).float().cpu().numpy()
        yield he_to_unit(he), draws, point
    progress.finish(label)


def bound_batches(run: Run, info: DatasetInfo, keys: list[tuple[str, int]], options: CalibrateOptions,
                  progress: Progress, label: str, baseline: Run | None = None
                  ) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray | None]]:
    """Per batch of ``keys``: (target, (lower, upper) of the interval run in one call, baseline output or None),
    in [-1, 1]. Deterministic: no noise is drawn."""
    progress.start(label, f"{label}: {len(keys)} tiles, one network call each", len(keys))
    for af, he in _batches(info, keys, options.batch_size):
        lo, hi = run.interval(torch.from_numpy(run.normalize(af)))
        point = None
        if baseline is not None:
            point = baseline.translate(torch.from_numpy(baseline.normalize(af))).float().cpu().numpy()
        progress.advance(label, len(af))
        yield he_to_unit(he), (lo.cpu().numpy(), hi.cpu().numpy()), point
    progress.finish(label)


def _merge_reports(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-batch coverage_report dicts (image-weighted means; equal tile sizes)."""
    n = sum(p["n"] for p in parts)
    out = {k: sum(p[k] * p["n"] for p in parts) / n for k in ("risk", "images_within_alpha", "mean_width")}
    out["coverage"] = 1.0 - out["risk"]
    # mean_width: of the interval clipped to [-1, 1] (coverage_report); in 0-255 RGB units here
    out.update(n=n, lam=parts[0]["lam"], mean_width_255=out["mean_width"] * UNIT_TO_255)
    return out


def _no_lambda_hint(options: CalibrateOptions, used: int, available: int) -> str:
    """What to change when no lambda of the grid controls the risk: only options that exist."""
    more = (f"calibrate on more tiles (--n, now {used})" if available > used else
            f"calibrate on more tiles (all {available} of the {options.split!r} split are used: tile more "
            f"slides into it, or choose another --split)")
    return f"{more}, raise --lambda-max (now {options.lambda_max:g}), or raise --alpha (now {options.alpha:g})"


def _risk_curve(risks: np.ndarray, lambdas: np.ndarray, points: int = 201) -> dict[str, list[float]]:
    """Mean calibration risk on a thinned lambda grid (for plots), up to where it reaches 0."""
    mean = risks.mean(axis=1)
    last = int(np.argmax(mean <= 0)) if (mean <= 0).any() else len(lambdas) - 1
    idx = np.unique(np.linspace(0, last, min(points, last + 1)).round().astype(int))
    return {"lam": [float(v) for v in lambdas[idx]], "risk": [float(v) for v in mean[idx]]}


def _cal_record(cal: Calibration) -> dict[str, Any]:
    """A Calibration's fields without the file's format tags (``Calibration.from_dict`` reads it back)."""
    return {k: v for k, v in cal.to_dict().items() if k not in ("format", "format_version")}


class _Level:
    """Risk tables of one block size (1 px: per pixel) on one split: the run's interval in each form, and the bands.

    ``kind`` is the interval source: "samples" (draws (N, B, 3, S, S) of a diffusion
    run) or "bounds" ((lower, upper) of a one-pass interval run).
    """

    def __init__(self, block_px: int, kind: str, forms: tuple[str, ...], options: CalibrateOptions,
                 bands: tuple[str, ...]):
        self.block_px, self.kind = block_px, kind
        self.forms = {f: RiskTable(IntervalSource(kind, f, options.q_low, options.q_high, options.lambda_max))
                      for f in forms}
        self.bands = {b: RiskTable(IntervalSource("band")) for b in bands}
        self.parts: dict[str, list[dict[str, float]]] = {f: [] for f in forms}  # held-out reports

    def add(self, target: np.ndarray, data: Any, point: np.ndarray | None,
            cals: dict[str, Calibration] | None = None, alpha: float = 0.1) -> None:
        """One batch: its block means, the base interval (lambda = 1), risks of every form and band.

        With ``cals`` (the held-out pass), each form's coverage at its calibrated lambda is kept too.
        """
        t = block_means(target, self.block_px)
        src = next(iter(self.forms.values())).source
        if self.kind == "bounds":
            blocks: Any = (block_means(data[0], self.block_px), block_means(data[1], self.block_px))
            lo, hi, center = src.base(blocks)
            own_point = center  # the run's midpoint
        else:
            lo, hi, center, own_point = sample_quantiles(block_means(data, self.block_px), src.q_low, src.q_high)
            # own_point: the sample mean
        for f, table in self.forms.items():
            table.add_base(t, lo, hi, center)
            if cals is not None and f in cals:
                self.parts[f].append(coverage_report(t, lo, hi, center, cals[f].lam, alpha, f))
        if POINT_BAND[self.kind] in self.bands:
            self.bands[POINT_BAND[self.kind]].add(t, own_point)
        if point is not None and "baseline_run" in self.bands:
            self.bands["baseline_run"].add(t, block_means(point, self.block_px))


def _calibrate_level(level: _Level, options: CalibrateOptions, hint: str, unit: str
                     ) -> dict[str, Calibration | str]:
    """RCPS of every table of a level: name -> Calibration, or the error line when no lambda works."""
    out: dict[str, Calibration | str] = {}
    for name, table in [*level.forms.items(), *level.bands.items()]:
        try:
            extra = {"samples": options.samples} if name in FORMS and level.kind == "samples" else {}
            out[name] = table.calibrate(options.alpha, options.delta, hint=hint, risk_unit=unit, **extra)
        except ValueError as e:  # no lambda keeps the risk bound (intervals.calibrate_lambda)
            out[name] = str(e)
    return out


def _band_entry(name: str, cal: Calibration | str, val: RiskTable, test: RiskTable | None,
                diffusion_test: dict[str, Any] | None) -> dict[str, Any]:
    """The trivial band's record: c, val width, test coverage and width, and the band at the diffusion's coverage."""
    if isinstance(cal, str):
        return {"center": name, "error": cal}
    entry: dict[str, Any] = {"center": name, "c": cal.lam, **_cal_record(cal),
                             "val_mean_width_255": val.report(cal.lam, cal.alpha)["mean_width"] * UNIT_TO_255,
                             "test_coverage": None, "matched": None, "diffusion_narrower": None}
    if test is None or test.n == 0:
        return entry
    rep = test.report(cal.lam, cal.alpha)
    rep["mean_width_255"] = rep["mean_width"] * UNIT_TO_255
    entry["test_coverage"] = rep
    if diffusion_test is not None:
        c = test.lambda_for_coverage(diffusion_test["coverage"])
        if c is not None:
            m = test.report(c, cal.alpha)
            entry["matched"] = {"c": c, "coverage": m["coverage"], "mean_width_255": m["mean_width"] * UNIT_TO_255}
            entry["diffusion_narrower"] = bool(diffusion_test["mean_width_255"] < entry["matched"]["mean_width_255"])
    return entry


def _form_entry(cal: Calibration | str, test: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(cal, str):
        return {"error": cal}
    return {"lam": cal.lam, "risk": cal.risk, "ucb": cal.ucb, "test_coverage": test}


def _load_baseline(options: CalibrateOptions, info: DatasetInfo) -> Run | None:
    """The ``--baseline`` run (regression or pix2pix), checked against the dataset."""
    if options.baseline is None:
        return None
    run = resolve_run(bundled_path(options.baseline) or Path(options.baseline), options.device)
    if run.kind not in BASELINE_KINDS:
        raise InputError(f"--baseline must be a {' or '.join(BASELINE_KINDS)} run (one output per tile), "
                         f"this is a {run.kind} run", run.path)
    check_compatible(run, info, diffusion=False)
    return run


def _sampling_of(run: Run, options: CalibrateOptions, warn) -> tuple[CalibrateOptions, dict[str, Any] | None]:
    """``options`` with the sampler, steps and eta resolved, and the protocol record (None: an interval run,
    which draws no samples; sampling flags given for one are reported as ignored)."""
    if run.kind == INTERVAL_KIND:
        d = CalibrateOptions()
        given = [flag for flag, now, default in (
            ("--samples", options.samples, d.samples), ("--sampler", options.sampler, d.sampler),
            ("--steps", options.steps, d.steps), ("--eta", options.eta, d.eta),
            ("--protocol", options.protocol, d.protocol)) if now != default]
        if given:
            warn(f"{', '.join(given)} ignored: an interval run gives its bounds in one network call per tile, "
                 "without samples")
        return options, None
    try:
        sampler, steps, eta = resolve_protocol(options.protocol, options.sampler, options.steps, options.eta)
        sampling = protocol_record(options.protocol, sampler, steps, eta, run.schedule.T)
    except ValueError as e:
        raise InputError(str(e)) from None
    if sampling["steps"] > run.schedule.T:
        raise InputError(f"--steps {sampling['steps']} exceeds the model's T = {run.schedule.T} steps", run.path)
    return replace(options, sampler=sampler, steps=steps, eta=eta), sampling


def calibrate_run(
    model: str | Path | Run,
    data: str | Path,
    options: CalibrateOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> CalibrateResult:
    """Calibrate lambda on ``options.split``, check coverage on ``options.test_split``; write RUN/calibration.json.

    ``model``: a diffusion run (interval of N samples) or an interval run (its one-call bounds).
    """
    options = options or CalibrateOptions()
    options.check()
    progress = progress or NullProgress()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        progress.warn(message)

    t0 = time.perf_counter()
    run_dir = model.path if isinstance(model, Run) else (bundled_path(model) or Path(model))
    out = run_dir / CALIBRATION_FILE
    if run_dir.resolve().is_relative_to(bundle_root().resolve()):
        raise InputError("is a bundled run, which ships calibrated and is never modified; copy the folder and "
                         "calibrate the copy", run_dir)
    check_output_file(out, force)
    run = resolve_run(model, options.device)
    info = open_dataset(data)
    check_compatible(run, info)
    kind = "bounds" if run.kind == INTERVAL_KIND else "samples"
    form = options.interval or DEFAULT_FORMS[kind]
    options = replace(options, interval=form)
    scales = resolve_scales(info, tuple(options.scales))
    baseline = _load_baseline(options, info)
    if not info.patch_keys(options.split):
        raise InputError(f"dataset has no tiles in the {options.split!r} split", info.root / "dataset.json")
    available = len(info.patch_keys(options.split))
    if available < options.n:
        warn(f"--n {options.n} is more than the {available} tiles of the {options.split} split: "
             f"calibrating on all {available}")
    available_test = len(info.patch_keys(options.test_split)) if options.test_split else 0
    if 0 < available_test < options.n:
        warn(f"--n {options.n} is more than the {available_test} tiles of the {options.test_split} "
             f"split: checking coverage on all {available_test}")
    if options.test_split == options.split:
        warn(f"testing on the calibration split {options.split!r}: the coverage check is optimistic")
    drawn, sampling = _sampling_of(run, options, warn)

    keys = chosen_keys(info, options.split, options.n)
    dataset_grades = sorted({e.label for e in info.slides.values()})
    slides: dict[str, Any] = {"calibration": split_slides(info, options.split, keys), "test": None,
                              "dataset_grades": dataset_grades, "min_slides": MIN_CALIBRATION_SLIDES}
    line = coverage_warning(slides["calibration"], dataset_grades)
    if line:
        warn(line)
    bands = (POINT_BAND[kind], "baseline_run") if baseline is not None else (POINT_BAND[kind],)
    blocks = sorted({1, *(s.block_px for s in scales)})

    def levels() -> dict[int, _Level]:  # per pixel: both forms; structure scales: the chosen form
        return {b: _Level(b, kind, FORMS if b == 1 else (form,), options, bands) for b in blocks}

    def batches(split_keys: list[tuple[str, int]], phase: int, label: str) -> Iterator[tuple[np.ndarray, Any, Any]]:
        if kind == "bounds":
            return bound_batches(run, info, split_keys, drawn, progress, label, baseline)
        return sample_batches(run, info, split_keys, drawn, phase, progress, label, baseline)

    val = levels()
    for target, data, point in batches(keys, 0, options.split):
        for level in val.values():
            level.add(target, data, point)
    n = val[1].forms[form].n
    hint = _no_lambda_hint(options, n, available)
    cals = {b: _calibrate_level(level, options, hint, "pixel-channel" if b == 1 else "block-channel")
            for b, level in val.items()}
    cal = cals[1][form]
    if isinstance(cal, str):
        raise InputError(cal)

    test_levels: dict[int, _Level] | None = None
    if options.test_split and info.patch_keys(options.test_split):
        test_keys = chosen_keys(info, options.test_split, options.n)
        slides["test"] = split_slides(info, options.test_split, test_keys)
        test_levels = levels()
        for target, data, point in batches(test_keys, 1, options.test_split):
            for b, level in test_levels.items():
                ok = {f: c for f, c in cals[b].items() if f in FORMS and isinstance(c, Calibration)}
                level.add(target, data, point, ok, options.alpha)
    elif options.test_split:
        warn(f"dataset has no tiles in the {options.test_split!r} split: no held-out coverage check")

    def tests_of(b: int) -> dict[str, dict[str, Any]]:
        if test_levels is None:
            return {}
        return {f: _merge_reports(p) for f, p in test_levels[b].parts.items() if p}

    def bands_of(b: int, model_test: dict[str, Any] | None) -> dict[str, Any]:
        entries = {}
        for name in bands:
            t = None if test_levels is None else test_levels[b].bands[name]
            entries[name] = _band_entry(name, cals[b][name], val[b].bands[name], t, model_test)
        return entries

    tests = tests_of(1)
    test = tests.get(form)
    forms = {f: _form_entry(cals[1][f], tests.get(f)) for f in (form, *[f for f in FORMS if f != form])}
    baselines = bands_of(1, test)
    if baseline is not None:
        baselines["baseline_run"].update(model=str(baseline.path), model_kind=baseline.kind,
                                         model_step=baseline.step)
    scale_entries = []
    for s in scales:
        c = cals[s.block_px][form]
        entry: dict[str, Any] = {"scale_um": s.um, "block_px": s.block_px, "block_um": s.block_um}
        if isinstance(c, str):
            warn(f"--scale {s.um:g} µm: {c}")
            entry["error"] = c
        else:
            st = tests_of(s.block_px).get(form)
            entry.update(_cal_record(c), val_mean_width_raw_255=val[s.block_px].forms[form].raw_width
                         * UNIT_TO_255, test_coverage=st, baselines=bands_of(s.block_px, st))
            if baseline is not None:
                entry["baselines"]["baseline_run"].update(model=str(baseline.path), model_kind=baseline.kind)
        scale_entries.append(entry)

    val_width = val[1].forms[form].raw_width * UNIT_TO_255
    config = {**asdict(options), "steps_effective": None if sampling is None else sampling["steps"]}
    inputs = {"dataset.json": fingerprint(info.root / "dataset.json")}
    if baseline is not None and (baseline.path / WEIGHTS).is_file():
        inputs["baseline"] = fingerprint(baseline.path / WEIGHTS)
    if sampling is None:  # an interval run: one network call per tile, nothing drawn
        how = {"protocol": None, "sampler": None, "steps": None, "steps_effective": None, "eta": None,
               "sampling": None, "network_calls": 1}
    else:
        how = {"protocol": options.protocol, "sampler": drawn.sampler, "steps": drawn.steps,
               "steps_effective": sampling["steps"], "eta": sampling["eta"], "sampling": sampling}
    doc = {
        **cal.to_dict(),
        **how,
        "seed": options.seed, "batch_size": options.batch_size, "split": options.split,
        "test_split": options.test_split, "model": str(run.path), "model_kind": run.kind, "model_step": run.step,
        "dataset": {**info.fingerprint(), "dataset.json": fingerprint(info.root / "dataset.json")},
        "val_mean_width_raw_255": val_width,
        "width_unit": WIDTH_UNIT,
        "risk_curve": _risk_curve(val[1].forms[form].table, val[1].forms[form].lambdas),
        "test_coverage": test,
        "forms": forms,
        "baselines": baselines,
        "scales": scale_entries,
        "slides": slides,
        "warnings": warnings,
        "provenance": record(config, inputs),
    }
    write_json(out, doc)
    return CalibrateResult(out, cal, test, val_width, time.perf_counter() - t0, sampling or {}, forms, baselines,
                           scale_entries, slides, warnings, kind)


__all__ = ["CalibrateOptions", "CalibrateResult", "Scale", "bound_batches", "calibrate_run", "chosen_keys",
           "coverage_warning", "resolve_scales", "sample_batches", "split_slides", "spread_indices", "BANDS",
           "INTERVAL_KIND", "MIN_CALIBRATION_SLIDES", "POINT_BAND"]
