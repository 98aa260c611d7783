"""``vstain tile``: slide pairs -> paired patch dataset, split by slide."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from vstain_cli.cli.common import cli_progress, console, force_option, handles_errors, out


@handles_errors
def tile(
    pairs: Path = typer.Argument(..., help="pairs.csv: slide_id,af,he,label[,split] (paths relative to it)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),
    size: int = typer.Option(128, "--size", help="Patch size in pixels (the paper: 128; at most the slide size)."),
    stride: int = typer.Option(128, "--stride", help="Distance between patches in pixels."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Keep patches with at least this tissue fraction."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the split by slide (0.5/0.2/0.3, stratified by label)."),
    max_shift: float = typer.Option(3.0, "--max-shift", help="Drop patches of registered pairs still misaligned "
                                    "by more than this (µm); unregistered pairs are checked on a sample."),
    workers: int = typer.Option(2, "--workers", help="Reader threads."),
    force: bool = force_option("Redo an existing dataset from scratch."),
) -> None:
    """Cut co-registered AF + H&E slide pairs into --size x --size paired tissue patches, split by slide."""
    from rich.table import Table

    from vstain_cli.data.tiling import TileOptions
    from vstain_cli.data.tiling import tile as run_tile

    t0 = time.perf_counter()
    options = TileOptions(size=size, stride=stride, min_tissue=min_tissue, split_seed=split_seed,
                          max_shift=max_shift)
    with cli_progress() as progress:
        summary = run_tile(pairs, out_dir, options, workers=workers, force=force, progress=progress)
    dt = time.perf_counter() - t0

    counts = summary.counts()
    labels = sorted({r.label for r in summary.slides})
    table = Table(title=f"patches in {summary.out}")
    table.add_column("split")
    table.add_column("slides", justify="right")
    for lb in labels:
        table.add_column(f"label {lb}", justify="right")
    table.add_column("total", justify="right")
    for split, by_label in counts.items():
        n_slides = sum(1 for r in summary.slides if r.split == split and r.patches)
        table.add_row(split, str(n_slides), *[str(by_label.get(lb, 0)) for lb in labels], str(sum(by_label.values())))
    out.print(table)
    total = sum(r.patches for r in summary.slides)
    resumed = sum(r.resumed for r in summary.slides)
    skipped = [r for r in summary.slides if r.skipped]
    msg = f"[green]{total} patches[/] from {len(summary.slides) - len(skipped)} slides in {dt:.1f} s"
    if resumed:
        msg += f" ({resumed} slides already done, skipped)"
    if skipped:
        msg += f"; [yellow]{len(skipped)} slides skipped (see the warnings)[/]"
    registered = [r for r in summary.slides if r.alignment.get("registered")]
    if registered:
        dropped = sum(r.alignment.get("dropped", 0) for r in registered)
        msg += f"; {dropped} misaligned patches (> {max_shift:g} µm) dropped: " + ", ".join(
            f"{r.slide_id} {r.alignment.get('dropped', 0)}" for r in registered)
        off = sum(r.alignment.get("off_slide", 0) for r in registered)
        if off:
            msg += f"; {off} patches whose H&E lies partly off the H&E slide dropped: " + ", ".join(
                f"{r.slide_id} {r.alignment.get('off_slide', 0)}" for r in registered if r.alignment.get("off_slide"))
    console.print(msg)
