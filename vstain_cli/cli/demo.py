"""``vstain demo``: the whole pipeline on phantom data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from vstain_cli.cli.common import (
    cli_progress,
    device_option,
    force_option,
    handles_errors,
    out,
    seed_option,
    stage_line,
)


@handles_errors
def demo(
    out_dir: Path = typer.Argument(Path("vstain-demo"), metavar="OUT", help="Folder for everything the demo makes."),
    slides: int = typer.Option(40, "--slides", help="Phantom slide pairs (40: split by slide and grade into 20 train, 8 val and 12 test slides, every grade in each)."),
    size: Tuple[int, int] = typer.Option((768, 768), "--size", metavar="H W", help="Slide height and width in px."),
    channels: int = typer.Option(26, "--channels", help="AF channels."),
    mpp: float = typer.Option(1.0, "--mpp", help="Phantom microns per pixel (1.0: a 32 px tile covers 32 um, the field of view of the paper's 128 px at 40x)."),
    tile: int = typer.Option(32, "--tile", help="Patch size in px for training and scoring."),
    retrain: bool = typer.Option(False, "--retrain", help="Train every model from scratch instead of using the bundled phantom runs."),
    export_bundle: Optional[Path] = typer.Option(None, "--export-bundle", metavar="DIR", help="With --retrain: write the trained runs as the bundled runs into DIR (models/runs in a checkout)."),
    diffusion_steps: Optional[int] = typer.Option(None, "--diffusion-steps", min=1, help="Training steps of the diffusion model (default: models/demo-diffusion.toml)."),
    baseline_steps: Optional[int] = typer.Option(None, "--baseline-steps", min=1, help="Training steps of regression and pix2pix (default: their presets)."),
    stainnet_steps: Optional[int] = typer.Option(None, "--stainnet-steps", min=1, help="Training steps of StainNet (default: its preset)."),
    phantom_seed: Optional[int] = typer.Option(None, "--phantom-seed", min=0, help="Make the phantom with this seed instead of --seed: with the bundled runs, every slide scored is one no run was trained or selected on."),
    reuse_bundled_calibration: bool = typer.Option(False, "--reuse-bundled-calibration", help="Use the bundled diffusion's calibration.json instead of calibrating on this demo's val slides (the report says so)."),
    distill_phase_steps: Optional[int] = typer.Option(None, "--distill-phase-steps", min=1, help="With training: optimizer steps (batch 16) per halving phase of the distilled 4- and 2-step samplers (16 -> 8 -> 4 -> 2 DDIM steps). Default: a third of the diffusion training steps (1000)."),
    interval_steps: Optional[int] = typer.Option(None, "--interval-steps", min=1, help="With training: optimizer steps of the one-call interval run's fine-tune. Default: two thirds of the diffusion training steps (2000)."),
    samples: int = typer.Option(8, "--samples", help="Diffusion samples per pixel (calibration, uncertainty)."),
    sample_steps: int = typer.Option(10, "--sample-steps", min=1, help="DPM-Solver++(2M) steps for every diffusion sample of the demo."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pt_inception-2015-12-05 weights file: adds FID."),
    device: str = device_option(),
    seed: int = seed_option("Seed of everything."),
    force: bool = force_option("Delete an earlier demo folder and start over."),
) -> None:
    """Run synth -> tile -> train (or the bundled runs) -> distill -> calibrate -> stain -> uncertainty -> score on phantom slides."""
    import sys
    import time

    from rich.table import Table

    from vstain_cli.cli.score import print_score_table
    from vstain_cli.demo import DemoOptions, run_demo
    from vstain_cli.demo import export_bundle as write_bundle
    from vstain_cli.errors import InputError

    if export_bundle is not None and not retrain:
        raise InputError("--export-bundle needs --retrain (the bundle is made by training from scratch)")
    options = DemoOptions(slides=slides, size=(int(size[0]), int(size[1])), channels=channels, mpp=mpp, tile=tile,
                          diffusion_steps=diffusion_steps, baseline_steps=baseline_steps,
                          stainnet_steps=stainnet_steps, samples=samples, sample_steps=sample_steps,
                          inception_weights=inception_weights, device=device, seed=seed, retrain=retrain,
                          phantom_seed=phantom_seed, reuse_bundled_calibration=reuse_bundled_calibration,
                          distill_phase_steps=distill_phase_steps, interval_steps=interval_steps)
    t0 = time.perf_counter()

    with cli_progress() as progress:
        res = run_demo(out_dir, options, force=force, progress=progress, stage=stage_line)

    stage_line("done", f"{time.perf_counter() - t0:.0f} s")
    if res.score:
        print_score_table(res.score)
    for name, t in res.training.items():
        kept = f", best validation at step {t['best_step']}" if t.get("best_step") is not None else ""
        out.print(f"{name}: {t['steps']} optimizer steps of batch {t['batch_size']}{kept}", highlight=False)
    if res.calibration_source:
        out.print(f"calibration: {res.calibration_source}", highlight=False)
    if res.calibration:
        c = res.calibration
        cov = (c.get("test_coverage") or {}).get("coverage")
        out.print(f"calibrated lambda {c['lam']:.2f} (alpha {c['alpha']}, delta {c['delta']}); "
                  f"test coverage {cov:.3f}" if cov is not None else f"calibrated lambda {c['lam']:.2f}")
    for line in res.comparison:
        out.print(line, highlight=False)
    files = Table(show_header=False, box=None)
    for k, v in res.files.items():
        files.add_row(k, str(v))
    out.print(files)
    if export_bundle is not None:
        command = " ".join(["vstain", *sys.argv[1:]])
        out.print(f"bundled runs written: {write_bundle(res, options, export_bundle, command)}")
    out.print(f"open [bold]{res.files.get('report')}[/] in a browser; the stained slides open in QuPath "
              f"(total {time.perf_counter() - t0:.0f} s)")
