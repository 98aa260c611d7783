"""``vstain train``: train a preset on a tiled dataset (resumable, DDP under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vstain_cli.cli.common import RichProgress, device_option, force_option, handles_errors, out, seed_option
from vstain_cli.runtime import place


@handles_errors
def train(
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name (see models/) or path to a preset TOML."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder written by `vstain tile`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/PRESET)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total optimizer steps (may grow on resume)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Global batch size (split over processes)."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Peak learning rate."),
    device: str = device_option(),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="bf16, fp16 or fp32 (default: the preset's; auto = bf16 on CUDA, fp32 on CPU)."
    ),
    seed: Optional[int] = seed_option("Seed of data order, noise and init.", default=None),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the run's last checkpoint."),
    force: bool = force_option("Start over in --out even if it holds another run."),
) -> None:
    """Train a model preset on a dataset; checkpoints, metrics and sample grids go to --out."""
    from vstain_cli.train.loop import train as run_training
    from vstain_cli.train.presets import load_preset

    p = load_preset(preset).with_train(steps=steps, batch_size=batch_size, lr=lr, precision=precision, seed=seed)
    target = out_dir or Path("runs") / p.name
    main = place().is_main
    with RichProgress(enabled=main) as progress:
        result = run_training(p, data, target, device=device, resume=resume, force=force, progress=progress)
    if not main:
        return
    if result.step == result.start_step:
        out.print(f"{p.name}: already trained to step {result.step} in {target} (raise --steps to continue)")
        return
    val = result.val
    parts = [f"val loss {val['loss']:.4g}" if "loss" in val else ""]
    if "accuracy" in val:
        parts.append(f"val accuracy {val['accuracy']:.3f}")
    if "sample_l1_255" in val:
        parts.append(f"sample L1 {val['sample_l1_255']:.2f}/255")
    info = ", ".join(x for x in parts if x)
    start = f" (resumed at step {result.start_step})" if result.start_step else ""
    out.print(f"{p.name}: trained to step {result.step}{start}; {info}; weights {result.weights}", highlight=False)
