"""``vstain stain``: a whole virtually stained slide from an AF slide."""

from __future__ import annotations

from pathlib import Path

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
def stain(
    af: AfSlide,
    model: ModelRun,
    out: Path = typer.Option(..., "--out", "-o", help="Output image: NAME.tif or NAME.tiff (pyramidal TIFF for "
                                                      "OpenSlide/QuPath) or NAME.zarr (OME-Zarr); other suffixes "
                                                      "are refused."),
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    protocol: Protocol = "fast",
    batch_size: BatchSize = 16,
    overlap: Overlap = None,
    region: Region = 1024,
    device: Device = "auto",
    seed: Seed = 0,
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG quality of the pyramid tiles."),
    out_format: OutFormat = None,
    mpp: Mpp = None,
    force: Force = False,
) -> None:
    """Virtually stain a whole AF slide, stitched without seams, as a pyramidal TIFF or OME-Zarr image."""
    from vstain_cli.diffusion.samplers import protocol_label
    from vstain_cli.infer.stain import StainOptions, stain_slide

    options = StainOptions(sampler=sampler, steps=steps, eta=eta, protocol=protocol, batch_size=batch_size,
                           overlap=overlap, region=region, device=device, seed=seed, quality=quality, mpp=mpp,
                           out_format=out_format)
    with cli_progress() as progress:
        result = stain_slide(af, model, out, options, force=force, progress=progress)
    if result.thumbnail is None:  # a non-zero torchrun rank
        return
    s = result.stats
    h, w = result.levels[0]
    how = f", sampled with {protocol_label(result.sampling)}" if result.sampling else ""
    sc = result.scale or {}
    if sc.get("resampled"):
        how += f"; read at the model's {sc['model_mpp']:g} µm/px, written at the slide's {sc['slide_mpp']:g} µm/px"
    console.print(
        f"[green]wrote[/] {result.out} ({w}x{h} px, {len(result.levels)} levels) and {result.thumbnail} "
        f"in {result.seconds:.1f} s; {s.regions} regions ({s.regions_background} background), "
        f"{s.windows} window evaluations{how}", highlight=False
    )
