"""``vstain calibrate``: calibrate a diffusion or interval run's uncertainty intervals (RCPS) on the val split."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vstain_cli.cli.common import (
    cli_progress,
    console,
    device_option,
    force_option,
    handles_errors,
    out,
    protocol_option,
    sampler_option,
    seed_option,
    steps_option,
)

BAND_LABELS = {"sample_mean": "band +-c around the diffusion sample mean",
               "midpoint": "band +-c around the interval run's midpoint",
               "baseline_run": "band +-c around the {kind} output"}
MODEL_LABELS = {"samples": "diffusion interval", "bounds": "interval run's interval"}


def _band_label(name: str, entry: dict) -> str:
    return BAND_LABELS[name].format(kind=entry.get("model_kind", "baseline"))


def _verdicts(baselines: dict, model_test: dict | None, where: str = "", source: str = "samples") -> None:
    """One line per trivial band: is the run's interval narrower at the same test coverage?"""
    label = MODEL_LABELS[source]
    for name, b in baselines.items():
        m = b.get("matched")
        if model_test is None or not m:
            continue
        verdict = "narrower" if b["diffusion_narrower"] else "[yellow]NOT narrower[/]"
        out.print(f"{where}{label} is {verdict} than the {_band_label(name, b)} at the same test "
                  f"coverage: width {model_test['mean_width_255']:.1f} vs {m['mean_width_255']:.1f} "
                  f"(band c = {m['c']:g} reaches coverage {m['coverage']:.1%}; the {label} "
                  f"{model_test['coverage']:.1%})", highlight=False)


def _print_table(result) -> None:
    """The calibration summary (``result``: a vstain_cli.uq.calibrate.CalibrateResult) as rich tables."""
    from rich.table import Table

    from vstain_cli.diffusion.samplers import protocol_label

    cal, test, source = result.calibration, result.test, result.source
    how = (f"x {cal.samples} samples ({protocol_label(result.sampling)})" if source == "samples" else
           "(interval run: bounds in one network call per tile)")
    t = Table(title=f"vstain calibrate: {cal.n} calibration tiles {how}, alpha = {cal.alpha:g}, "
                    f"delta = {cal.delta:g}, {cal.interval} interval", title_justify="left")
    for col in ("interval", "lambda / c", "val risk", "UCB", "test coverage", "mean interval width (0-255)"):
        t.add_column(col, justify="right")
    coverage = "n/a" if test is None else f"{test['coverage']:.1%} ({test['n']} tiles)"
    width = "n/a" if test is None else f"{test['mean_width_255']:.1f}"
    t.add_row(f"{'diffusion' if source == 'samples' else 'interval run'} ({cal.interval})", f"{cal.lam:.2f}", f"{cal.risk:.2%}", f"{cal.ucb:.2%} (< {cal.alpha:.0%})",
              coverage, width)
    for name, b in result.baselines.items():
        if "error" in b:
            t.add_row(_band_label(name, b), "n/a", "", "", b["error"], "")
            continue
        bt = b["test_coverage"]
        t.add_row(_band_label(name, b), f"{b['c']:g}", f"{b['risk']:.2%}", f"{b['ucb']:.2%}",
                  "n/a" if bt is None else f"{bt['coverage']:.1%}",
                  f"{bt['mean_width_255']:.1f}" if bt else f"{b['val_mean_width_255']:.1f} (val)")
    out.print(t)
    _verdicts(result.baselines, test, source=source)
    for form, f in result.forms.items():
        if form != cal.interval:
            fc = f.get("test_coverage")
            other = (f"lambda {f['lam']:.2f}" + (f", test coverage {fc['coverage']:.1%}, mean width "
                     f"{fc['mean_width_255']:.1f} (0-255)" if fc else "")) if "lam" in f else f["error"]
            out.print(f"{form} form, same draws (not used): {other}", highlight=False)
    if result.scales:
        what = "samples" if source == "samples" else "bounds"
        st = Table(title=f"structure scales: block means of the {what} and of the H&E, {cal.interval} interval",
                   title_justify="left")
        for col in ("scale (µm)", "block (px)", "lambda", "val risk", "test coverage", "mean width (0-255)",
                    *[f"{_band_label(nm, b)}: width" for nm, b in result.baselines.items()]):
            st.add_column(col, justify="right")
        for s in result.scales:
            if "error" in s:
                st.add_row(f"{s['scale_um']:g}", str(s["block_px"]), "n/a", "", s["error"], "")
                continue
            sc = s["test_coverage"]
            bands = [b.get("test_coverage") or {} for b in s["baselines"].values()]
            st.add_row(f"{s['scale_um']:g}", str(s["block_px"]), f"{s['lam']:.2f}", f"{s['risk']:.2%}",
                       "n/a" if sc is None else f"{sc['coverage']:.1%}",
                       "n/a" if sc is None else f"{sc['mean_width_255']:.1f}",
                       *[f"{b['mean_width_255']:.1f} ({b['coverage']:.1%})" if b else "n/a" for b in bands])
        out.print(st)
        for s in result.scales:
            if "error" not in s:
                _verdicts(s["baselines"], s["test_coverage"], f"at {s['scale_um']:g} µm: ", source)
    used = result.slides.get("calibration") or {}
    if used:
        out.print(f"calibration tiles from {len(used['slides'])} {used['split']} slides of grades "
                  f"{', '.join(map(str, used['grades']))}", highlight=False)
    if test is not None and test["coverage"] < 1 - cal.alpha:
        console.print(f"[yellow]warning:[/] test coverage {test['coverage']:.1%} is below 1 - alpha = "
                      f"{1 - cal.alpha:.0%}: the test tiles differ from the calibration tiles (or the guarantee's "
                      f"delta = {cal.delta:g} failure chance struck); calibrate on more, more representative tiles",
                      highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {result.path} in {result.seconds:.1f} s; widths: mean per-pixel width of "
                  f"the interval at lambda, clipped to the valid range, on the 0-255 RGB scale (raw 5-95 % "
                  f"width, lambda = 1, on the calibration tiles: {result.val_width:.1f})", highlight=False)


@handles_errors
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Trained diffusion run folder (runs/NAME), the bundled phantom-diffusion, or an interval run of `vstain distill --intervals` (its bounds, one network call per tile)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder written by `vstain tile`."),
    split: str = typer.Option("val", "--split", help="Split to calibrate on (never train)."),
    test_split: str = typer.Option("test", "--test-split", help="Split for the held-out coverage check ('none' to skip)."),
    samples: int = typer.Option(20, "--samples", help="Diffusion samples per tile (paper: 20; an interval run draws none)."),
    n: int = typer.Option(200, "--n", help="Tiles per split, evenly spread over it."),
    alpha: float = typer.Option(0.1, "--alpha", help="Risk level: at most this fraction of pixels outside."),
    delta: float = typer.Option(0.1, "--delta", help="Failure probability of the guarantee."),
    interval: Optional[str] = typer.Option(None, "--interval", metavar="FORM",
                                           help="How lambda scales the interval: multiplicative ([l/lambda, "
                                                "u*lambda] on [0, 1], Conffusion, the paper's; the default for a "
                                                "diffusion run) or centered (around the sample median, im2im-uq; "
                                                "around the midpoint of an interval run's bounds, its default)."),
    lambda_max: float = typer.Option(10.0, "--lambda-max", metavar="FLOAT",
                                     help="Upper end of the lambda grid searched (0.00, 0.01, ..., this; 1-100). "
                                          "Raise it when no lambda keeps the risk below alpha."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    protocol: str = protocol_option(),
    seed: int = seed_option("Seed of the sample noise."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", metavar="RUN",
                                            help="A regression or pix2pix run (folder or bundled name): also "
                                                 "calibrate the trivial constant band +-c around its output, by the "
                                                 "same RCPS (the band around the diffusion sample mean is always "
                                                 "calibrated)."),
    scale: Optional[List[float]] = typer.Option(None, "--scale", metavar="UM",
                                                help="Also calibrate intervals of block means over UM x UM µm "
                                                     "blocks (tile mpp from dataset.json); repeatable, e.g. "
                                                     "--scale 1 --scale 4 --scale 16."),
    batch_size: int = typer.Option(16, "--batch-size", help="Tiles per network call."),
    device: str = device_option(),
    force: bool = force_option("Overwrite an existing MODEL/calibration.json."),
) -> None:
    """Calibrate the interval scale lambda (RCPS, Hoeffding-Bentkus) and check coverage on the test split,
    next to the trivial constant band calibrated the same way (and at structure scales with --scale)."""
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    options = CalibrateOptions(split=split, test_split=None if test_split.lower() == "none" else test_split,
                               samples=samples, n=n, alpha=alpha, delta=delta, sampler=sampler, steps=steps,
                               protocol=protocol, interval=interval, lambda_max=lambda_max, seed=seed,
                               batch_size=batch_size, device=device,
                               baseline=None if baseline is None else str(baseline), scales=tuple(scale or ()))
    with cli_progress() as progress:
        result = calibrate_run(model, data, options, force=force, progress=progress)
    _print_table(result)
