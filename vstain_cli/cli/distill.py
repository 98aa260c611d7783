"""``vstain distill``: a diffusion run made into a K-step sampler, or into a one-call interval run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


@handles_errors
def distill(
    model: str = typer.Option(..., "--model", "-m", metavar="RUN",
                              help="The diffusion run to distil: a run folder or a bundled name (phantom-diffusion)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Run folder to write (default: runs/TEACHER-distillK or "
                                                "runs/TEACHER-intervals)."),
    steps: int = typer.Option(4, "--steps", metavar="K",
                              help="Network calls per window of the distilled sampler: 1, 2, 4 or 8."),
    intervals: bool = typer.Option(False, "--intervals",
                                   help="Fine-tune into a one-call interval run (5 %/95 % quantiles, pinball "
                                        "loss) instead of distilling a sampler; --steps and --teacher-steps "
                                        "do not apply."),
    data: Optional[Path] = typer.Option(None, "--data", "-d",
                                        help="Dataset folder (`vstain tile`) to train on (default: the "
                                             "teacher's)."),
    teacher_steps: Optional[int] = typer.Option(
        None, "--teacher-steps", min=2, metavar="N",
        help="DDIM steps of the teacher that phase 1 halves (default 16; a distilled teacher: its own K)."),
    phase_steps: int = typer.Option(500, "--phase-steps", min=1, metavar="INT",
                                    help="Optimizer steps per halving phase (with --intervals: in all)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Batch size."),
    lr: float = typer.Option(2e-4, "--lr", min=0.0, help="Learning rate (AdamW, constant; reset each phase)."),
    device: str = device_option(),
    seed: int = seed_option("Seed of data order, noise and timesteps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the run's last checkpoint."),
    force: bool = force_option("Start over in --out even if it holds another run."),
) -> None:
    """Distil a diffusion run into a K-step sampler (progressive distillation), or with --intervals into a
    run that gives lower and upper bounds in one network call per window (Conffusion).

    The result is a run folder that stain, uncertainty, calibrate and score accept: a distilled run
    samples with K DDIM steps by default (a different --seed there gives a different sample). Ctrl-C or
    SIGTERM writes a checkpoint at the current step; the same command resumes there.
    """
    from vstain_cli.infer.bundled import bundled_path
    from vstain_cli.train.distill import DistillOptions
    from vstain_cli.train.distill import distill as run_distill

    teacher = bundled_path(model) or Path(model)
    options = DistillOptions(intervals=intervals, steps=steps, teacher_steps=teacher_steps, phase_steps=phase_steps,
                             batch_size=batch_size, lr=lr, seed=seed)
    name = teacher.name + ("-intervals" if intervals else f"-distill{steps}")
    target = out_dir or Path("runs") / name
    main = place().is_main
    with removes_new_outputs(target), cli_progress(enabled=main) as progress:
        result = run_distill(teacher, target, options, data=data, device=device, resume=resume, force=force,
                             progress=progress)
    if not main:
        return
    what = "interval run (1 network call per window)" if intervals else f"{steps}-step sampler"
    if result.step == result.start_step:
        out.print(f"{target}: already distilled ({what}, step {result.step})", highlight=False)
        return
    out.print(f"{target}: {what} distilled from {model} in {result.step} steps{resumed_at(result)}; "
              f"{val_summary(result.val)}; "
              f"weights {result.weights}", highlight=False)
