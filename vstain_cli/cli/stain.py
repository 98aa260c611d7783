"""``vstain stain``: a whole virtually stained slide from an AF slide."""

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
    protocol_option,
    sampler_option,
    seed_option,
    steps_option,
)


@handles_errors
def stain(
    af: Path = typer.Argument(..., help="AF slide: OME-TIFF/TIFF, QPTIFF, CZI or OME-Zarr (any channel count)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained run folder (runs/NAME), or a bundled run: phantom-diffusion, phantom-regression, phantom-pix2pix."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: a pyramidal TIFF (OpenSlide/QuPath) or, with --format zarr or a .zarr suffix, an OME-Zarr image."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    protocol: str = protocol_option(),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per network call."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Window overlap in px (default: a quarter window for diffusion, half for regression/pix2pix)."),
    region: int = typer.Option(1024, "--region", help="Streaming region size in px (bounds memory)."),
    device: str = device_option(),
    seed: int = seed_option("Seed: same seed, same slide."),
    quality: int = typer.Option(90, "--quality", help="JPEG quality of the pyramid tiles."),
    out_format: Optional[str] = typer.Option(
        None, "--format", help="Output: tiff (pyramidal TIFF) or zarr (OME-Zarr, NGFF 0.4); default from --out's suffix."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="The slide's µm/px when its file lacks or misstates it (it is resampled to the model's)."),
    force: bool = force_option("Overwrite an existing output."),
) -> None:
    """Virtually stain a whole AF slide, stitched without seams, as a pyramidal TIFF or OME-Zarr image."""
    from vstain_cli.infer.stain import StainOptions, stain_slide

    options = StainOptions(sampler=sampler, steps=steps, protocol=protocol, batch_size=batch_size, overlap=overlap, region=region,
                           device=device, seed=seed, quality=quality, mpp=mpp,
                           out_format=out_format or ("zarr" if out.suffix.lower() == ".zarr" else "tiff"))
    with RichProgress() as progress:
        result = stain_slide(af, model, out, options, force=force, progress=progress)
    if result.thumbnail is None:  # a non-zero torchrun rank
        return
    s = result.stats
    h, w = result.levels[0]
    from vstain_cli.diffusion.samplers import protocol_label

    how = f", sampled with {protocol_label(result.sampling)}" if result.sampling else ""
    sc = result.scale or {}
    if sc.get("resampled"):
        how += f"; read at the model's {sc['model_mpp']:g} µm/px, written at the slide's {sc['slide_mpp']:g} µm/px"
    console.print(
        f"[green]wrote[/] {result.out} ({w}x{h} px, {len(result.levels)} levels) and {result.thumbnail.name} "
        f"in {result.seconds:.1f} s; {s.regions} regions ({s.regions_background} background), "
        f"{s.windows} window evaluations{how}", highlight=False
    )
