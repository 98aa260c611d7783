"""``vstain register``: estimate the AF -> H&E registration of every slide pair."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from vstain_cli.cli.common import RichProgress, console, force_option, handles_errors


@handles_errors
def register(
    pairs: Path = typer.Argument(..., help="pairs.csv: slide_id,af,he,label[,split] (paths relative to it)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the registrations, pictures and the new pairs.csv."),
    max_rotation: float = typer.Option(10.0, "--max-rotation", help="Rotations searched either way (degrees)."),
    block_um: float = typer.Option(128.0, "--block", help="Side of the full-resolution blocks (µm)."),
    step_um: float = typer.Option(64.0, "--step", help="Spacing of the residual-shift grid (µm)."),
    min_confidence: float = typer.Option(0.3, "--min-confidence",
                                         help="Blocks whose correlation after the shift is lower are not used."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Microns per pixel of both slides (default: from the files)."),
    force: bool = force_option("Redo an existing registration folder."),
) -> None:
    """Align each H&E to its AF (rigid, affine, then local shifts) and write a pairs.csv that tile reads through it."""
    from vstain_cli.data.register_pairs import register_pairs
    from vstain_cli.data.registration import RegisterOptions

    t0 = time.perf_counter()
    options = RegisterOptions(max_rotation=max_rotation, block_um=block_um, step_um=step_um,
                              min_confidence=min_confidence)
    with RichProgress() as progress:
        csv_path = register_pairs(pairs, out_dir, options, mpp=mpp, force=force, progress=progress)
    console.print(f"[green]registered[/] the pairs of {pairs} into {csv_path} in {time.perf_counter() - t0:.1f} s")
