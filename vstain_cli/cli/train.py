"""``vstain train``: train a preset on a tiled dataset (resumable, preemption-safe, DDP under torchrun)."""

from __future__ import annotations

import importlib.resources
import inspect
from pathlib import Path
from typing import Optional

import tomllib
import typer

from vstain_cli.cli.common import (
    cli_progress,
    device_option,
    force_option,
    handles_errors,
    out,
    removes_new_outputs,
    resumed_at,
    seed_option,
    val_summary,
)
from vstain_cli.runtime import place


def preset_lines() -> list[str]:
    """``name (kind): first sentence of its description`` for every bundled preset (TOML only, no torch)."""
    lines = []
    root = importlib.resources.files("vstain_cli.presets")
    for res in sorted(root.iterdir(), key=lambda r: r.name):
        if not res.name.endswith(".toml"):
            continue
        try:
            data = tomllib.loads(res.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        desc = str(data.get("description", "")).split("(")[0].split(";")[0].strip().rstrip(".")
        lines.append(f"{res.name[:-5]} ({data.get('kind', '?')}): {desc}")
    return lines


@handles_errors
def train(
    preset: str = typer.Option(..., "--preset", "-p", metavar="NAME|TOML",
                               help="A preset named below, or the path of a preset TOML file."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder written by `vstain tile`."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/PRESET)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total optimizer steps (may grow on resume)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Global batch size (split over processes)."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Peak learning rate."),
    device: str = device_option(),
    precision: Optional[str] = typer.Option(
        None, "--precision", metavar="NAME",
        help="bf16, fp16 or fp32 (default: the preset's; auto = bf16 on CUDA, fp32 on CPU)."
    ),
    seed: Optional[int] = seed_option("Seed of data order, noise and init.", default=None),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the run's last checkpoint."),
    force: bool = force_option("Start over in --out even if it holds another run."),
) -> None:
    """Train a model preset on a dataset; checkpoints, metrics and sample grids go to --out.

    Ctrl-C or SIGTERM (a scheduler's preemption) writes a checkpoint at the current step; the same command resumes there.
    """
    from vstain_cli.train.loop import train as run_training
    from vstain_cli.train.presets import load_preset

    p = load_preset(preset).with_train(steps=steps, batch_size=batch_size, lr=lr, precision=precision, seed=seed)
    target = out_dir or Path("runs") / p.name
    main = place().is_main
    with removes_new_outputs(target), cli_progress(enabled=main) as progress:
        result = run_training(p, data, target, device=device, resume=resume, force=force, progress=progress)
    if not main:
        return
    best = (f"; exported the weights of step {result.best_step} (best val loss {result.best_val_loss:.4g})"
            if result.best_step is not None else "")
    if result.step == result.start_step:
        out.print(f"{p.name}: already trained to step {result.step} in {target}{best} (raise --steps to continue)",
                  highlight=False)
        return
    out.print(f"{p.name}: trained to step {result.step}{resumed_at(result)}; {val_summary(result.val)}{best}; "
              f"weights {result.weights}",
              highlight=False)


train.__doc__ = inspect.cleandoc(train.__doc__ or "") + "\n\nPresets (models/):\n\n" + "\n\n".join(
    f"- {line}" for line in preset_lines())
