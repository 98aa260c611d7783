"""``vstain calibrate``: the interval scale lambda of a diffusion run, by RCPS.

Sridhar et al. 2023 scale the per-pixel 5-95 % sample interval by a factor lambda
calibrated on the validation split (lambda = 1.32 in the paper, in Conffusion's
multiplicative form, Horwitz & Hoshen 2022). Here lambda is calibrated in the
form ``interval`` asks for (multiplicative, the default, or centered as in
im2im-uq, Angelopoulos et al. 2022), by risk-controlling prediction sets (Bates
et al. 2021):

1. ``n`` tiles evenly spread over the calibration split (deterministic), ``samples``
   diffusion samples per tile with ``Run.translate`` (one seeded generator per
   batch and sample), per-pixel quantiles (``uncertainty.sample_quantiles``);
2. per tile, the risk (fraction of pixel-channel values of the real H&E outside
   the interval) at every lambda of the grid (``uncertainty.interval_risks``);
3. lambda_hat = the RCPS choice with the Hoeffding-Bentkus bound
   (``uncertainty.calibrate_lambda``): with probability >= 1 - delta, the expected
   risk on new tiles is <= alpha;
4. a held-out check on the test split at lambda_hat (``uncertainty.coverage_report``).

The same draws also give lambda and the held-out check of the other form
(``forms`` in calibration.json, for comparison; maps use ``interval``'s). The
sampling protocol (sampler, effective steps and eta, ``--protocol``) is recorded.

The result is written atomically to ``RUN/calibration.json``, which
``vstain uncertainty`` picks up by default.
"""

from __future__ import annotations

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
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.infer.bundled import bundle_root, bundled_path
from vstain_cli.infer.run import Run, resolve_run
from vstain_cli.infer.wholeslide import require_diffusion
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import ensure_writable_dir, fingerprint, record, write_json
from vstain_cli.train.run_folder import CALIBRATION_FILE
from vstain_cli.uq.intervals import (
    DEFAULT_FORM,
    DEFAULT_LAMBDA_MAX,
    FORMS,
    MODEL_RANGE,
    Calibration,
    calibrate_lambda,
    clipped_width,
    coverage_report,
    interval_risks,
    lambda_grid,
    sample_quantiles,
)

WIDTH_UNIT = "0-255 RGB; mean per-pixel width of the interval clipped to 0-255"
LAMBDA_MAX_LIMIT = 100.0  # grid points (0.01 apart) x tiles x forms stay a few tens of MB

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
    interval: str = DEFAULT_FORM
    lambda_max: float = DEFAULT_LAMBDA_MAX  # upper end of the lambda grid searched (0.00, 0.01, ..., lambda_max)
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown --protocol {self.protocol!r} (choose from {', '.join(PROTOCOLS)})")
        if self.interval not in FORMS:
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


def check_compatible(run: Run, info: DatasetInfo) -> None:
    """A diffusion run whose channels and tile size match the dataset."""
    require_diffusion(run)
    if info.channels != run.channels:
        raise InputError(f"dataset has {info.channels} AF channels but model {run.path.name} was trained on "
                         f"{run.channels}", info.root / "dataset.json")
    if info.tile_size != run.tile_size:
        raise InputError(f"dataset tiles are {info.tile_size} px but model {run.path.name} was trained on "
                         f"{run.tile_size} px tiles (calibrate on tiles of the training size)",
                         info.root / "dataset.json")


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


def sample_intervals(run: Run, info: DatasetInfo, split: str, options: CalibrateOptions, phase: int,
                     progress: Progress) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch of the split's chosen tiles: (target, lower, upper, median) in [-1, 1].

    Quantiles over ``samples`` draws per tile (Sridhar et al. 2023: 5th/95th of 20).
    """
    keys = info.patch_keys(split)
    chosen = [keys[i] for i in spread_indices(len(keys), options.n)]
    progress.start(split, f"{split}: {len(chosen)} tiles x {options.samples} samples", len(chosen) * options.samples)
    for b, (af, he) in enumerate(_batches(info, chosen, options.batch_size)):
        x = torch.from_numpy(run.normalize(af))
        draws = np.empty((options.samples, len(af), 3, *af.shape[-2:]), np.float32)
        for k in range(options.samples):
            g = seeding.torch_generator(seeding.derive_seed(options.seed, seeding.CALIBRATE, phase, b, k))  # CPU
            draws[k] = run.translate(x, sampler=options.sampler, steps=options.steps, eta=options.eta,
                                     generator=g).float().cpu().numpy()
            progress.advance(split, len(af))
        lo, hi, med, _ = sample_quantiles(draws, options.q_low, options.q_high)
        yield he_to_unit(he), lo, hi, med
    progress.finish(split)


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


def calibrate_run(
    model: str | Path | Run,
    data: str | Path,
    options: CalibrateOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> CalibrateResult:
    """Calibrate lambda on ``options.split``, check coverage on ``options.test_split``; write RUN/calibration.json."""
    options = options or CalibrateOptions()
    options.check()
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    run_dir = model.path if isinstance(model, Run) else (bundled_path(model) or Path(model))
    out = run_dir / CALIBRATION_FILE
    if run_dir.resolve().is_relative_to(bundle_root().resolve()):
        raise InputError("is a bundled run, which ships calibrated and is never modified; copy the folder and "
                         "calibrate the copy", run_dir)
    if out.exists() and not force:
        raise OutputExistsError("calibration exists; pass --force to recalibrate", out)
    run = resolve_run(model, options.device)
    info = open_dataset(data)
    check_compatible(run, info)
    if not info.patch_keys(options.split):
        raise InputError(f"dataset has no tiles in the {options.split!r} split", info.root / "dataset.json")
    available = len(info.patch_keys(options.split))
    if available < options.n:
        progress.warn(f"--n {options.n} is more than the {available} tiles of the {options.split} split: "
                      f"calibrating on all {available}")
    available_test = len(info.patch_keys(options.test_split)) if options.test_split else 0
    if 0 < available_test < options.n:
        progress.warn(f"--n {options.n} is more than the {available_test} tiles of the {options.test_split} "
                      f"split: checking coverage on all {available_test}")
    if options.test_split == options.split:
        progress.warn(f"testing on the calibration split {options.split!r}: the coverage check is optimistic")
    try:
        sampler, steps, eta = resolve_protocol(options.protocol, options.sampler, options.steps, options.eta)
        sampling = protocol_record(options.protocol, sampler, steps, eta, run.schedule.T)
    except ValueError as e:
        raise InputError(str(e)) from None
    if sampling["steps"] > run.schedule.T:
        raise InputError(f"--steps {sampling['steps']} exceeds the model's T = {run.schedule.T} steps", run.path)
    drawn = replace(options, sampler=sampler, steps=steps, eta=eta)
    ensure_writable_dir(run_dir)
    lambdas = lambda_grid(options.lambda_max)
    risks: dict[str, list[np.ndarray]] = {f: [] for f in FORMS}
    widths = []
    for target, lo, hi, med in sample_intervals(run, info, options.split, drawn, 0, progress):
        for f in FORMS:  # (L, B): risk of each tile at each lambda, in each form (same draws)
            risks[f].append(interval_risks(target, lo, hi, med, lambdas, f))
        widths.append(clipped_width(lo, hi, MODEL_RANGE) * len(target))
    tables = {f: np.concatenate(r, axis=1) for f, r in risks.items()}
    table = tables[options.interval]
    n = table.shape[1]
    meta = dict(q_low=options.q_low, q_high=options.q_high, samples=options.samples,
                hint=_no_lambda_hint(options, n, available))
    cal = calibrate_lambda(table, lambdas, options.alpha, options.delta, interval=options.interval, **meta)
    others: dict[str, Calibration | str] = {}
    for f in FORMS:
        if f != options.interval:
            try:
                others[f] = calibrate_lambda(tables[f], lambdas, options.alpha, options.delta, interval=f, **meta)
            except InputError as e:
                others[f] = str(e)
    cals = {options.interval: cal, **others}
    test = None
    tests: dict[str, dict[str, Any]] = {}
    if options.test_split and info.patch_keys(options.test_split):
        parts: dict[str, list[dict[str, float]]] = {f: [] for f in cals if isinstance(cals[f], Calibration)}
        for target, lo, hi, med in sample_intervals(run, info, options.test_split, drawn, 1, progress):
            for f in parts:
                parts[f].append(coverage_report(target, lo, hi, med, cals[f].lam, options.alpha, f))
        tests = {f: _merge_reports(p) for f, p in parts.items()}
        test = tests[options.interval]
    elif options.test_split:
        progress.warn(f"dataset has no tiles in the {options.test_split!r} split: no held-out coverage check")
    forms = {}
    for f, c in cals.items():
        forms[f] = ({"error": c} if isinstance(c, str) else
                    {"lam": c.lam, "risk": c.risk, "ucb": c.ucb, "test_coverage": tests.get(f)})
    val_width = sum(widths) / n * UNIT_TO_255
    config = {**asdict(options), "steps_effective": sampling["steps"]}
    doc = {
        **cal.to_dict(),
        "protocol": options.protocol, "sampler": sampler, "steps": steps, "steps_effective": sampling["steps"],
        "eta": sampling["eta"], "sampling": sampling,
        "seed": options.seed, "batch_size": options.batch_size, "split": options.split,
        "test_split": options.test_split, "model": str(run.path), "model_kind": run.kind, "model_step": run.step,
        "dataset": {**info.fingerprint(), "dataset.json": fingerprint(info.root / "dataset.json")},
        "val_mean_width_raw_255": val_width,
        "width_unit": WIDTH_UNIT,
        "risk_curve": _risk_curve(table, lambdas),
        "test_coverage": test,
        "forms": forms,
        "provenance": record(config, {"dataset.json": fingerprint(info.root / "dataset.json")}),
    }
    write_json(out, doc)
    return CalibrateResult(out, cal, test, val_width, time.perf_counter() - t0, sampling, forms)


__all__ = ["CalibrateOptions", "CalibrateResult", "calibrate_run", "sample_intervals", "spread_indices"]
