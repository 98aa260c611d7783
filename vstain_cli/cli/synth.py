"""``vstain synth``: phantom co-registered AF + H&E slide pairs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Tuple

import typer

from vstain_cli.cli.common import cli_progress, console, force_option, handles_errors, seed_option


@handles_errors
def synth(
    out: Path = typer.Argument(..., help="Folder to write the slide pairs and pairs.csv into."),
    slides: int = typer.Option(4, "--slides", help="Number of slide pairs (labels cycle 0-3)."),
    size: Tuple[int, int] = typer.Option((4096, 4096), "--size", metavar="H W", help="Slide height and width in pixels (H W)."),
    channels: int = typer.Option(26, "--channels", help="AF spectral channels."),
    mpp: float = typer.Option(0.5, "--mpp", help="Microns per pixel."),
    seed: int = seed_option("Random seed (same seed, same slides)."),
    workers: int = typer.Option(2, "--workers", help="Threads rendering strips."),
    af_compression: str = typer.Option("none", "--af-compression", help="AF TIFF codec: none, zstd or zlib."),
    misregister: bool = typer.Option(False, "--misregister", help="Move each H&E against its AF by a random "
                                     "known transform (<= 5 deg, 200 µm, 3 % scale, 20 µm local warp) onto a canvas "
                                     "that holds all of it, recorded in <id>.he.truth.json (tile it through "
                                     "vstain register)."),
    force: bool = force_option("Overwrite existing phantom data."),
) -> None:
    """Make phantom liver slide pairs (AF OME-TIFF + pyramidal H&E TIFF) and pairs.csv."""
    from vstain_cli.data.synth.render import megapixels
    from vstain_cli.data.synth.render import synth as run_synth
    from vstain_cli.errors import InputError

    hw = (int(size[0]), int(size[1]))
    if af_compression not in ("none", "zstd", "zlib"):
        raise InputError(f"unknown --af-compression {af_compression!r} (none, zstd or zlib)")
    t0 = time.perf_counter()
    with cli_progress() as progress:
        csv_path = run_synth(out, slides, hw, channels, mpp, seed, workers=workers,
                             af_compression=None if af_compression == "none" else af_compression,
                             force=force, progress=progress)
        if misregister:
            from vstain_cli.data.synth.misregister import misregister_pairs

            misregister_pairs(csv_path, seed=seed, mpp=mpp, progress=progress)
    dt = time.perf_counter() - t0
    mpx = megapixels(hw, slides)
    console.print(
        f"[green]wrote[/] {slides} phantom pairs ({hw[0]}x{hw[1]}, {channels} AF channels) "
        f"and {csv_path} in {dt:.1f} s ({mpx / dt:.1f} Mpx/s)"
    )

