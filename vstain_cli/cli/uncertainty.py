"""``vstain uncertainty``: calibrated per-pixel credible-interval maps of a whole AF slide."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vstain_cli.cli.common import (
    AfSlide,
    BatchSize,
    Device,
    Eta,
    Force,
    ModelRun,
    Mpp,
    OutFormat,
    Overlap,
    Protocol,
    Region,
    Sampler,
    Seed,
    Steps,
    cli_progress,
    console,
    handles_errors,
)


@handles_errors
def uncertainty(
    af: AfSlide,
    model: ModelRun,
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (lower/upper/mean/width maps, uncertainty.json)."),
    samples: Optional[int] = typer.Option(
        None, "--samples", "-n", help="Diffusion samples per region (default: the calibration's, else 20 as the "
                                      "paper; ignored for an interval run, which needs none)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration",
        help="calibration.json from `vstain calibrate` (default: MODEL/calibration.json if present, else lambda = 1)."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", metavar="HE_SLIDE",
        help="The real H&E of the same slide (registered, same size): measure the coverage and mean width of the "
             "intervals on tissue."),
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    protocol: Protocol = "fast",
    batch_size: BatchSize = 16,
    overlap: Overlap = None,
    region: Region = 1024,
    scale: Optional[List[float]] = typer.Option(
        None, "--scale", metavar="UM",
        help="Also write maps of the interval of UM x UM µm block means (lower/upper/width.UMum.tif), with that "
             "scale's lambda from `vstain calibrate --scale UM`; repeatable, e.g. --scale 1 --scale 4 --scale 16."),
    width_max: Optional[float] = typer.Option(
        None, "--width-max", help="Top of the heat-map scale in 0-255 units (default: 99th percentile over tissue)."),
    device: Device = "auto",
    seed: Seed = 0,
    out_format: OutFormat = None,
    mpp: Mpp = None,
    force: Force = False,
) -> None:
    """Write calibrated interval maps (lower, upper, mean, width) of a slide: from N samples of a diffusion run,
    or in one network call per window from an interval run (`vstain distill --intervals`)."""
    from vstain_cli.uq.maps import UncertaintyOptions, uncertainty_slide

    options = UncertaintyOptions(sampler=sampler, steps=steps, eta=eta, protocol=protocol, batch_size=batch_size,
                                 overlap=overlap, region=region, device=device, seed=seed, samples=samples,
                                 width_max=width_max, mpp=mpp, out_format=out_format, scales=tuple(scale or ()))
    with cli_progress() as progress:
        result = uncertainty_slide(af, model, out, options, calibration=calibration, reference=reference,
                                    force=force, progress=progress)
    if result is None:  # a non-zero torchrun rank
        return
    h, w = result.levels[0]
    s = result.summary
    from vstain_cli.diffusion.samplers import protocol_label

    source = f"{result.interval}, from {result.calibration}" if result.calibration else "uncalibrated"
    checked = ""
    if result.reference is not None and result.reference["coverage"] is not None:
        r = result.reference
        goal = "" if r["nominal_coverage"] is None else f" (calibrated for >= {r['nominal_coverage']:.0%})"
        checked = (f"; reference H&E coverage on tissue {r['coverage']:.1%}{goal}, mean width "
                   f"{r['mean_width_tissue']:.1f}")
    sc = result.scale or {}
    resampled = (f"; read at the model's {sc['model_mpp']:g} µm/px, written at the slide's {sc['slide_mpp']:g} µm/px"
                 if sc.get("resampled") else "")
    how = (f"{result.samples} samples, {protocol_label(result.sampling)}" if result.source == "samples" else
           "interval run, one network call per window")
    console.print(
        f"[green]wrote[/] {result.out}/ ({w}x{h} px, {len(result.levels)} levels, {how}) in {result.seconds:.1f} s"
        f"{resampled}; lambda = {result.lam:g} ({source}); "
        f"mean interval width over tissue {s['mean_width_tissue']:.1f} (median {s['median_width_tissue']:.1f}, "
        f"p95 {s['p95_width_tissue']:.1f}) in 0-255 units; heat map 0-{result.heatmap_max:g}{checked}",
        highlight=False,
    )
    for e in result.scales:
        b = e["summary"]
        console.print(
            f"  at {e['scale_um']:g} µm ({e['block_px_out']} px blocks, lambda = {e['lam']:g}): mean width of the "
            f"block-mean interval over tissue {b['mean_width_tissue']:.1f} (median {b['median_width_tissue']:.1f}, "
            f"p95 {b['p95_width_tissue']:.1f}; {b['tissue_blocks']} tissue blocks)", highlight=False)
