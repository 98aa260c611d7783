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
    sampler_option,
    seed_option,
    steps_option,
)


def _print_table(result) -> None:
    """The calibration summary (``result``: a vstain_cli.uq.calibrate.CalibrateResult) as a rich table."""
    from rich.table import Table

    cal, test = result.calibration, result.test
    t = Table(title=f"vstain calibrate: {cal.n} calibration tiles x {cal.samples} samples, "
                    f"alpha = {cal.alpha:g}, delta = {cal.delta:g}", title_justify="left")
    for col in ("lambda", "val risk", "UCB", "test coverage", "mean interval width"):
        t.add_column(col, justify="right")
    coverage = "n/a" if test is None else f"{test['coverage']:.1%} ({test['n']} tiles)"
    width = "n/a" if test is None else f"{test['mean_width_255']:.1f}"
    t.add_row(f"{cal.lam:.2f}", f"{cal.risk:.2%}", f"{cal.ucb:.2%} (< {cal.alpha:.0%})", coverage, width)
    out.print(t)
    if test is not None and test["coverage"] < 1 - cal.alpha:
        console.print(f"[yellow]warning:[/] test coverage {test['coverage']:.1%} is below 1 - alpha = "
                      f"{1 - cal.alpha:.0%}: the test tiles differ from the calibration tiles (or the guarantee's "
                      f"delta = {cal.delta:g} failure chance struck); calibrate on more, more representative tiles",
                      highlight=False, soft_wrap=True)
    console.print(f"[green]wrote[/] {result.path} in {result.seconds:.1f} s; widths in 0-255 units at lambda "
                  f"(raw 5-95 % width on the calibration tiles: {result.val_width:.1f})")


@handles_errors
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Trained diffusion run folder (runs/NAME)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder written by `vstain tile`."),
    split: str = typer.Option("val", "--split", help="Split to calibrate on (never train)."),
    test_split: str = typer.Option("test", "--test-split", help="Split for the held-out coverage check ('none' to skip)."),
    samples: int = typer.Option(20, "--samples", help="Diffusion samples per tile (paper: 20)."),
    n: int = typer.Option(200, "--n", help="Tiles per split, evenly spread over it."),
    alpha: float = typer.Option(0.1, "--alpha", help="Risk level: at most this fraction of pixels outside."),
    delta: float = typer.Option(0.1, "--delta", help="Failure probability of the guarantee."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    seed: int = seed_option("Seed of the sample noise."),
    batch_size: int = typer.Option(16, "--batch-size", help="Tiles per network call."),
    device: str = device_option(),
    force: bool = force_option("Overwrite an existing MODEL/calibration.json."),
) -> None:
    """Calibrate the interval scale lambda (RCPS, Hoeffding-Bentkus) and check coverage on the test split."""
    from vstain_cli.uq.calibrate import CalibrateOptions, calibrate_run

    options = CalibrateOptions(split=split, test_split=None if test_split.lower() == "none" else test_split,
                               samples=samples, n=n, alpha=alpha, delta=delta, sampler=sampler, steps=steps,
                               seed=seed, batch_size=batch_size, device=device)
    with RichProgress() as progress:
        result = calibrate_run(model, data, options, force=force, progress=progress)
    _print_table(result)
