"""``vstain demo``: the whole pipeline on phantom data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from vstain_cli.cli.common import RichProgress, console, device_option, force_option, handles_errors, out, seed_option


@handles_errors
def demo(
    out_dir: Path = typer.Argument(Path("vstain-demo"), help="Folder for everything the demo makes."),
    slides: int = typer.Option(12, "--slides", help="Phantom slide pairs."),
    size: Tuple[int, int] = typer.Option((768, 768), "--size", help="Slide height and width in px."),
    channels: int = typer.Option(26, "--channels", help="AF channels."),
    tile: int = typer.Option(32, "--tile", help="Patch size for training (the paper: 128; 32 keeps a CPU demo short)."),
    diffusion_steps: int = typer.Option(600, "--diffusion-steps", help="Training steps of the diffusion model."),
    baseline_steps: int = typer.Option(300, "--baseline-steps", help="Training steps of regression and pix2pix."),
    samples: int = typer.Option(8, "--samples", help="Diffusion samples per pixel (calibration, uncertainty)."),
    sample_steps: int = typer.Option(10, "--sample-steps", help="DDIM steps for every diffusion sample of the demo."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pt_inception-2015-12-05 weights file: adds FID."),
    device: str = device_option(),
    seed: int = seed_option("Seed of everything."),
    force: bool = force_option("Delete an earlier demo folder and start over."),
) -> None:
    """Run synth -> tile -> train -> calibrate -> stain -> uncertainty -> score on phantom slides."""
    import time

    from rich.table import Table

    from vstain_cli.cli.score import print_score_table
    from vstain_cli.demo import DemoOptions, run_demo

    options = DemoOptions(slides=slides, size=(int(size[0]), int(size[1])), channels=channels, tile=tile,
                          diffusion_steps=diffusion_steps, baseline_steps=baseline_steps, samples=samples,
                          sample_steps=sample_steps,
                          inception_weights=inception_weights, device=device, seed=seed)
    t0 = time.perf_counter()

    def stage(name: str, detail: str) -> None:
        console.rule(f"[bold]{name}[/] [dim]{detail}[/]", align="left")

    with RichProgress() as progress:
        res = run_demo(out_dir, options, force=force, progress=progress, stage=stage)

    console.rule("[bold green]done", align="left")
    if res.score:
        print_score_table(res.score)
    if res.calibration:
        c = res.calibration
        cov = (c.get("test_coverage") or {}).get("coverage")
        out.print(f"calibrated lambda {c['lam']:.2f} (alpha {c['alpha']}, delta {c['delta']}); "
                  f"test coverage {cov:.3f}" if cov is not None else f"calibrated lambda {c['lam']:.2f}")
    files = Table(show_header=False, box=None)
    for k, v in res.files.items():
        files.add_row(k, str(v))
    out.print(files)
    out.print(f"open [bold]{res.files.get('report')}[/] in a browser; the stained slides open in QuPath "
              f"(total {time.perf_counter() - t0:.0f} s)")
