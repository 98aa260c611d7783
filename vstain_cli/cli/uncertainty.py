"""``vstain uncertainty``: calibrated per-pixel credible-interval maps of a whole AF slide."""

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
    sampler_option,
    seed_option,
    steps_option,
)


@handles_errors
def uncertainty(
    af: Path = typer.Argument(..., help="AF slide (multi-channel OME-TIFF/TIFF)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained diffusion run folder (runs/NAME)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (lower/upper/mean/width maps, uncertainty.json)."),
    samples: int = typer.Option(20, "--samples", "-n", help="Diffusion samples per region (paper: 20)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration",
        help="calibration.json from `vstain calibrate` (default: MODEL/calibration.json if present, else lambda = 1)."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per network call."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Window overlap in px (default: a quarter window)."),
    region: int = typer.Option(1024, "--region",
                               help="Streaming region size in px; memory ~ samples x (region + window)^2 x 12 bytes."),
    width_max: Optional[float] = typer.Option(
        None, "--width-max", help="Top of the heat-map scale in 0-255 units (default: 99th percentile over tissue)."),
    device: str = device_option(),
    seed: int = seed_option("Seed: sample k uses the noise of `stain` sample index k."),
    force: bool = force_option("Replace an existing output folder."),
) -> None:
    """Sample a slide N times and write calibrated 5-95 % interval maps (lower, upper, mean, width)."""
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    options = UncertaintyOptions(sampler=sampler, steps=steps, batch_size=batch_size, overlap=overlap, region=region,
                                 device=device, seed=seed, samples=samples, width_max=width_max)
    with RichProgress() as progress:
        result = uncertainty_slide(af, model, out, options, calibration=calibration, force=force, progress=progress)
    if result is None:  # a non-zero torchrun rank
        return
    h, w = result.levels[0]
    s = result.summary
    source = f"from {result.calibration}" if result.calibration else "uncalibrated"
    console.print(
        f"[green]wrote[/] {result.out}/ ({w}x{h} px, {len(result.levels)} levels, {samples} samples) "
        f"in {result.seconds:.1f} s; lambda = {result.lam:g} ({source}); mean interval width over tissue "
        f"{s['mean_width_tissue']:.1f} (median {s['median_width_tissue']:.1f}, p95 {s['p95_width_tissue']:.1f}) "
        f"in 0-255 units; heat map 0-{result.heatmap_max:g}"
    )
