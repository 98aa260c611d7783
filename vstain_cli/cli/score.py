"""``vstain score``: FID / FSD / PFD / L1 / L2 / PSNR / SSIM of stained tiles vs real H&E, grade agreement."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vstain_cli.cli.common import (
    cli_progress,
    console,
    device_option,
    force_option,
    handles_errors,
    out,
    protocol_option,
    removes_new_outputs,
    sampler_option,
    seed_option,
    steps_option,
)


def print_score_table(results: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from vstain_cli.score.report import DIGITS, HIGHER_IS_BETTER, METRIC_ORDER, format_interval

    models = results["models"]
    cols = [m for m in METRIC_ORDER if any(m in r["metrics"] for r in models.values())]
    settings = results.get("settings", {})
    how = (f"slide-level: {settings.get('n_slides')} slides resampled" if settings.get("intervals") == "slides"
           else "tile-level: slides unknown")
    t = Table(title=f"vstain score: {results['n_real']} real tiles, 95% intervals ({how})", title_justify="left")
    t.add_column("model")
    for c in cols:
        t.add_column(f"{c} {'↑' if HIGHER_IS_BETTER[c] else '↓'}", justify="right")
    t.add_column("tiles", justify="right")
    for name, r in models.items():
        cells = []
        for c in cols:
            val, _, ci = format_interval(r["metrics"].get(c), DIGITS[c]).partition(" ")
            cells.append(f"{val}\n[dim]{escape(ci)}[/]" if ci else val)
        t.add_row(escape(name), *cells, f"{r['n']}{'' if r['paired'] else ' unpaired'}")
    out.print(t)
    for name, r in models.items():
        g = r.get("grade")
        if g:
            ratio = g["tile_ratio"]["value"]
            out.print(f"{escape(name)}: StainNet grade accuracy {g['tile_accuracy']['value']:.3f} on its tiles vs "
                      f"{g['real_tile_accuracy']['value']:.3f} on the real tiles (ratio "
                      f"{'-' if ratio is None else f'{ratio:.3f}'}); slides right {g['slides_correct']}/{g['slides']} "
                      f"vs {g['real_slides_correct']}/{g['slides']}", highlight=False)
    if results.get("noise_check"):
        from vstain_cli.score.noise_check import sentence

        out.print(f"noise check: {escape(sentence(results['noise_check']))}", highlight=False)


@handles_errors
def score(
    real: Optional[Path] = typer.Option(None, "--real", help="Real H&E tiles: a folder of PNG/JPEG/TIFF, a .npy (N,3,H,W)/(N,H,W,3) uint8, or a dataset folder (uses --split). Default: --data."),
    fake: Optional[List[Path]] = typer.Option(None, "--fake", help="Stained tiles of one model (same forms as --real); repeat for several models. Tiles pair with --real by file name."),
    model: Optional[List[Path]] = typer.Option(None, "--model", help="A trained run folder (runs/NAME) or a bundled run (phantom-diffusion, ...): stains the AF of --data's --split tiles (same tiles and seeds for every model); repeatable."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder whose --split gives the AF for --model (and the real tiles when --real is not given)."),
    name: Optional[List[str]] = typer.Option(None, "--name", help="Display names: one per --fake, then one per --model (default: file/folder name)."),
    stainnet: Optional[Path] = typer.Option(None, "--stainnet", help="Trained StainNet run folder (runs/stainnet) or the bundled phantom-stainnet: enables FSD."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors): enables FID. Nothing is downloaded."),
    n: Optional[int] = typer.Option(None, "--n", min=2, help="Score a seeded random subset of N tiles (the same tiles for every model)."),
    seed: int = seed_option("Seed for the tile subset, the diffusion noise and the bootstrap."),
    split: str = typer.Option("test", "--split", help="Split to read from dataset folders."),
    sampler: str = sampler_option(),
    steps: Optional[int] = steps_option(),
    eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta (0 = deterministic)."),
    protocol: str = protocol_option(),
    n_boot: int = typer.Option(1000, "--boot", min=10, help="Bootstrap resamples for the mean metrics (L1, L2, PSNR, SSIM)."),
    fd_boot: int = typer.Option(100, "--fd-boot", min=10, help="Subsamples (half of each set, without replacement) for the FID/FSD intervals; each costs two covariances and an eigendecomposition."),
    unpaired: bool = typer.Option(False, "--unpaired", help="Do not pair --fake sets with real tiles: FD only, no L1/L2/PSNR/SSIM."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Tiles per network batch."),
    device: str = device_option(),
    grid_rows: int = typer.Option(6, "--grid-rows", min=0, help="Example tiles shown in the report."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: score.json, report.html, per_image.csv (+ samples-NAME.npy for --model)."),
    force: bool = force_option("Overwrite existing outputs."),
    uncertainty_samples: Optional[int] = typer.Option(None, "--uncertainty-samples", min=2, help="Diffusion samples per tile for the report's uncertainty panel (runs with a calibration.json; default: the calibration's own count)."),
    uncertainty_rows: int = typer.Option(3, "--uncertainty-rows", min=0, help="Example tiles in the uncertainty panel (0: none)."),
    noise_check: bool = typer.Option(True, "--noise-check/--no-noise-check", help="Also score regression + N(0, 16) noise as a pseudo-model and say whether it beats diffusion on PFD and FSD (when a regression and a diffusion model are scored with --stainnet)."),
) -> None:
    """Score stained tiles against real H&E: FID, FSD, PFD, L1, L2, PSNR, SSIM with 95% intervals (slides resampled
    when the tiles come from a dataset), StainNet grade agreement and a noise check."""
    from vstain_cli.score.pipeline import EvaluateOptions, evaluate

    options = EvaluateOptions(
        real=real, fakes=list(fake or []), models=list(model or []), data=data, names=list(name or []) or None,
        stainnet=stainnet, inception_weights=inception_weights, n=n, seed=seed, split=split, sampler=sampler,
        steps=steps, eta=eta, protocol=protocol, n_boot=n_boot, fd_boot=fd_boot, unpaired=unpaired, batch_size=batch_size,
        device=device, grid_rows=grid_rows, out_dir=out_dir, force=force,
        uncertainty_samples=uncertainty_samples, uncertainty_rows=uncertainty_rows, noise_check=noise_check,
    )
    with removes_new_outputs(out_dir), cli_progress() as prog:
        result = evaluate(options, prog)
    print_score_table(result.results)
    from vstain_cli.score.report import sampling_label

    for nm, r in result.results["models"].items():
        if r.get("sampling"):
            console.print(f"[dim]{nm}: sampled with {sampling_label(r['sampling'])}[/]", highlight=False)
    for msg in result.notes:
        console.print(f"[dim]{msg}[/]", highlight=False)
    console.print(f"wrote {result.paths['score.json']}, {result.paths['report.html']}", highlight=False)
