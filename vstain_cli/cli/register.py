"""``vstain register``: estimate the AF -> H&E registration of every slide pair."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from vstain_cli.cli.common import cli_progress, console, fail, force_option, handles_errors


@handles_errors
def register(
    pairs: Path = typer.Argument(..., help="pairs.csv: slide_id,af,he,label[,split] (paths relative to it)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the registrations, pictures and the new pairs.csv."),
    max_rotation: float = typer.Option(10.0, "--max-rotation", help="Rotations searched either way (degrees)."),
    block_um: float = typer.Option(128.0, "--block", help="Side of the full-resolution blocks (µm)."),
    step_um: float = typer.Option(64.0, "--step", help="Spacing of the residual-shift grid (µm)."),
    min_confidence: float = typer.Option(0.3, "--min-confidence",
                                         help="Blocks whose correlation after the shift is lower are not used."),
    min_blocks: int = typer.Option(10, "--min-blocks", help="Quality bar: matched tissue blocks, at least."),
    min_matched: float = typer.Option(0.25, "--min-matched",
                                      help="Quality bar: share of the measured tissue blocks that matched, at least."),
    max_residual: float = typer.Option(1.5, "--max-residual",
                                       help="Quality bar: median shift (µm) the second pass still measures at "
                                            "matched blocks, at most."),
    max_scale_change: float = typer.Option(0.15, "--max-scale-change",
                                           help="Quality bar: each axis scale within 1 ± this of the pixel-size ratio."),
    strict: bool = typer.Option(False, "--strict",
                                help="Exit 2 if any pair fails the quality bar (the passing ones are still written)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Microns per pixel of both slides (default: from the files)."),
    force: bool = force_option("Redo an existing registration folder."),
) -> None:
    """Align each H&E to its AF (rigid, affine, then local shifts) and write a pairs.csv that tile reads through it.

    A pair below the quality bar is failed: named in one line, kept out of
    pairs.csv, its registration.json marked failed (tile refuses it). Exit 2
    when every pair fails (or any, with --strict).
    """
    from vstain_cli.data.register_pairs import register_pairs
    from vstain_cli.data.registration import RegisterOptions

    t0 = time.perf_counter()
    options = RegisterOptions(max_rotation=max_rotation, block_um=block_um, step_um=step_um,
                              min_confidence=min_confidence, min_blocks=min_blocks, min_matched=min_matched,
                              max_residual_um=max_residual, max_scale_change=max_scale_change)
    with cli_progress() as progress:
        result = register_pairs(pairs, out_dir, options, mpp=mpp, force=force, progress=progress)
    n = len(result.passed) + len(result.failed)
    took = time.perf_counter() - t0
    if not result.failed:
        console.print(f"[green]registered[/] the {n} pairs of {pairs} into {result.pairs_csv} in {took:.1f} s",
                      highlight=False, soft_wrap=True)
        return
    summary = (f"{len(result.passed)} of {n} pairs into {result.pairs_csv} in {took:.1f} s; "
               f"failed the quality bar, kept out of it: {', '.join(result.failed)}")
    if strict:
        fail(f"{pairs}: --strict: registered only {summary}")
    console.print(f"[yellow]registered[/] {summary}", highlight=False, soft_wrap=True)
