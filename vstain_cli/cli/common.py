"""Shared CLI plumbing: error handling, rich progress, consoles."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichBars,
)

from vstain_cli.errors import VstainError

# tifffile logs parse problems of bad files; our errors already name them in one line
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    """True when ``--debug`` was given (or VSTAIN_DEBUG=1 is set)."""
    return os.environ.get("VSTAIN_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Turn VstainError into one line and exit 2; other errors into one line and exit 1.

    With ``--debug`` the traceback is shown instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VstainError as e:
            if debug_enabled():
                raise
            fail(str(e), 2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing half-written is left; tile, train and demo resume when rerun")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MemoryError:
            if debug_enabled():
                raise
            fail("out of memory; try a smaller --batch-size", 1)
        except Exception as e:  # noqa: BLE001 - last-resort guard for the CLI
            if debug_enabled():
                raise
            fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)", 1)

    return wrapper  # type: ignore[return-value]


class RichProgress:
    """The core's Progress protocol drawn as rich progress bars."""

    def __init__(self, enabled: bool = True) -> None:
        self.bars = RichBars(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or not sys.stderr.isatty() and os.environ.get("VSTAIN_PROGRESS") != "1",
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.warnings: list[str] = []

    def __enter__(self) -> "RichProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def start(self, key: str, description: str, total: int | None) -> None:
        if key in self.tasks:
            self.bars.reset(self.tasks[key], total=total, description=description)
        else:
            self.tasks[key] = self.bars.add_task(description, total=total, rate="")

    def advance(self, key: str, n: int = 1) -> None:
        task_id = self.tasks.get(key)
        if task_id is None:
            return
        self.bars.advance(task_id, n)
        speed = self.bars._tasks[task_id].speed  # noqa: SLF001 - rich has no public getter
        if speed:
            self.bars.update(task_id, rate=f"{speed:,.1f}/s")

    def finish(self, key: str) -> None:
        task_id = self.tasks.get(key)
        if task_id is not None:
            t = self.bars._tasks[task_id]  # noqa: SLF001
            if t.total is not None:
                self.bars.update(task_id, completed=t.total)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- shared options
# One definition of each option that several commands take, so the flag, its
# choices and its help read the same everywhere.


def device_option() -> Any:
    """``--device``: resolved by vstain_cli.runtime with the same rules in every command."""
    from vstain_cli.runtime import DEVICE_CHOICES

    return typer.Option("auto", "--device", metavar="DEVICE",
                        help=f"Where to run: {DEVICE_CHOICES} (auto: CUDA, else MPS, else CPU).")


def force_option(what: str = "Overwrite an existing output.") -> Any:
    """``--force`` with a command-specific sentence of what it replaces."""
    return typer.Option(False, "--force", help=what)


def seed_option(what: str = "Seed: same seed, same output.", default: Any = 0) -> Any:
    """``--seed``."""
    return typer.Option(default, "--seed", min=0, metavar="INT", help=what)


def sampler_option() -> Any:
    """``--sampler`` listing the registry's choices and their default steps."""
    from vstain_cli.diffusion.samplers import SAMPLERS

    choices = "; ".join(f"{name}: {spec.summary}" for name, spec in SAMPLERS.items())
    return typer.Option("ddim", "--sampler", metavar="NAME", help=f"Sampler of diffusion runs ({choices}).")


def steps_option() -> Any:
    """``--steps``: sampler steps, default the sampler's own."""
    return typer.Option(None, "--steps", min=1, max=10_000, metavar="INT",
                        help="Sampler steps (default: the sampler's, see --sampler).")
