"""``vstain calibrate``: calibrate a diffusion run's uncertainty intervals (RCPS) on the val split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vstain_cli.cli.common import (
    RichProgress,
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


def _print_table(result) -> None:
    """The calibration summary (``result``: a vstain_cli.uq.calibrate.CalibrateResult) as a rich table."""
    from rich.table import Table

    cal, test = result.calibration, result.test
    from vstain_cli.diffusion.samplers import protocol_label

    t = Table(title=f"vstain calibrate: {cal.n} calibration tiles x {cal.samples} samples "
                    f"({protocol_label(result.sampling)}), alpha = {cal.alpha:g}, delta = {cal.delta:g}, "
                    f"{cal.interval} interval", title_justify="left")
    for col in ("lambda", "val risk", "UCB", "test coverage", "mean interval width (0-255)"):
        t.add_column(col, justify="right")
    coverage = "n/a" if test is None else f"{test['coverage']:.1%} ({test['n']} tiles)"
    width = "n/a" if test is None else f"{test['mean_width_255']:.1f}"
    t.add_row(f"{cal.lam:.2f}", f"{cal.risk:.2%}", f"{cal.ucb:.2%} (< {cal.alpha:.0%})", coverage, width)
    out.print(t)
    for form, f in result.forms.items():
        if form != cal.interval:
            fc = f.get("test_coverage")
            other = (f"lambda {f['lam']:.2f}" + (f", test coverage {fc['coverage']:.1%}, mean width "
                     f"{fc['mean_width_255']:.1f} (0-255)" if fc else "")) if "lam" in f else f["error"]
            out.print(f"{form} form, same draws (not used): {other}", highlight=False)
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
    model: Path = typer.Option(..., "--model", "-m", help="Trained diffusion run folder (runs/NAME), or the bundled phantom-diffusion."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder written by `vstain tile`."),
    split: str = typer.Option("val", "--split", help="Split to calibrate on (never train)."),
    test_split: str = typer.Option("test", "--test-split", help="Split for the held-out coverage check ('none' to skip)."),
    samples: int = typer.Option(20, "--samples", help="Diffusion samples per tile (paper: 20)."),
    n: int = typer.Option(200, "--n", help="Tiles per split, evenly spread over it."),
    alpha: float = typer.Option(0.1, "--alpha", help="Risk level: at most this fraction of pixels outside."),
    delta: float = typer.Option(0.1, "--delta", help="Failure probability of the guarantee."),
    interval: str = typer.Option("multiplicative", "--interval", metavar="FORM",
                                 help="How lambda scales the interval: multiplicative ([l/lambda, u*lambda] on "
                                      "[0, 1], Conffusion, the paper's) or centered (around the sample median, "
                                      "im2im-uq)."),
    lambda_max: float = typer.Option(10.0, "--lambda-max", metavar="FLOAT",
                                     help="Upper end of the lambda grid searched (0.00, 0.01, ..., this; 1-100). "
                                          "Raise it when no lambda keeps the risk below alpha."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    protocol: str = protocol_option(),
    seed: int = seed_option("Seed of the sample noise."),
    batch_size: int = typer.Option(16, "--batch-size", help="Tiles per network call."),
    device: str = device_option(),
    force: bool = force_option("Overwrite an existing MODEL/calibration.json."),
) -> None:
    """Calibrate the interval scale lambda (RCPS, Hoeffding-Bentkus) and check coverage on the test split."""
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    options = CalibrateOptions(split=split, test_split=None if test_split.lower() == "none" else test_split,
                               samples=samples, n=n, alpha=alpha, delta=delta, sampler=sampler, steps=steps,
                               protocol=protocol, interval=interval, lambda_max=lambda_max, seed=seed,
                               batch_size=batch_size, device=device)
    with RichProgress() as progress:
        result = calibrate_run(model, data, options, force=force, progress=progress)
    _print_table(result)
