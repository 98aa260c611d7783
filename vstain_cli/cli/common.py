"""Shared CLI plumbing: one error style, the flags every command takes, progress
for terminals and for logs, consoles, and the shared options."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
import typer.core
from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichProgressDisplay,
)

from vstain_cli.errors import VstainError
from vstain_cli.progress import Interrupted, LogProgress, emit_json, format_field, write_line

# tifffile logs parse problems of bad files; our errors already name them in one line
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

FLAGS: dict[str, bool] = {"debug": False, "quiet": False, "log_json": False}
GLOBAL_OPTIONS = ("--debug", "--quiet", "--log-json")
LOG_WIDTH = 240  # columns of tables printed into a file or pipe (no terminal to fit)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Console(Console):
    """A console that, writing into a file or pipe, is wide enough not to wrap or cut tables."""

    @property  # type: ignore[override]
    def size(self) -> Any:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        if not self.is_terminal and "COLUMNS" not in os.environ and dims.width < LOG_WIDTH:
            return ConsoleDimensions(LOG_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, value: Any) -> None:
        Console.size.fset(self, value)  # type: ignore[attr-defined]


# One convention: stdout carries a command's results only (tables, JSON asked for); progress,
# messages ("wrote ..."), warnings and errors go to stderr, as plain lines, rich bars or JSON.
console = _Console(stderr=True, soft_wrap=True)
out = _Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# ----------------------------------------------------------------------------- flags of every command
# --debug, --quiet and --log-json are accepted before or after the command name;
# they are parsed by click (expose_value=False) and kept here for one invocation.



def reset_flags() -> None:
    for k in FLAGS:
        FLAGS[k] = False


def debug_enabled() -> bool:
    """True when ``--debug`` was given (or VSTAIN_DEBUG=1 is set)."""
    return FLAGS["debug"] or os.environ.get("VSTAIN_DEBUG", "") not in ("", "0")


def _flag_setter(name: str) -> Callable[[bool], None]:
    def set_flag(value: bool) -> None:
        if value:
            FLAGS[name] = True
    return set_flag


def _global_params() -> list[Any]:
    """The click parameters of --debug, --quiet and --log-json (built once by typer)."""
    flags = typer.Typer()

    @flags.command()
    def _flags(
        debug: bool = typer.Option(False, "--debug", expose_value=False, callback=_flag_setter("debug"),
                                   help="Show the full traceback of an error (the exit code stays the same)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", expose_value=False, callback=_flag_setter("quiet"),
                                   help="No progress output (warnings, errors and the result still print)."),
        log_json: bool = typer.Option(False, "--log-json", expose_value=False, callback=_flag_setter("log_json"),
                                      help="Progress as one JSON object per line on stderr (for dashboards)."),
    ) -> None:
        pass

    params = [p for p in typer.main.get_command(flags).params if set(p.opts) & set(GLOBAL_OPTIONS)]
    for p in params:
        p.metavar = ""
    return params


# ----------------------------------------------------------------------------- clean help


def _metavar(param: Any) -> str:
    """INT, FLOAT, TEXT, PATH, ... for typer's ``<int>``, ``<list[Path]>``, ``<bool>``."""
    if getattr(param, "is_flag", False):
        return ""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_path:
        return "PATH"
    names = {"int": "INT", "float": "FLOAT", "str": "TEXT", "Path": "PATH", "bool": "BOOL"}
    raw = param.bare_type() if hasattr(param, "bare_type") else "TEXT"
    raw = raw.removeprefix("list[").removesuffix("]")
    if desc is not None and desc.is_tuple:
        from typing import get_args

        return " ".join(names.get(getattr(a, "__name__", "TEXT"), "TEXT") for a in get_args(desc.annotation))
    return names.get(raw, raw.upper())


def polish(command: Any) -> None:
    """Clean metavars and usage line of one command; add the global flags."""
    for p in command.params:
        if isinstance(p, typer.core.TyperArgument):
            if p.metavar is None:
                p.metavar = p.name.upper()
            name, kind = p.metavar, _metavar(p)
            p._usage_display_name = (lambda n=name, req=p.required: n if req else f"[{n}]")  # noqa: SLF001
            p.display_type_rich = lambda ctx, k=kind: k
        elif isinstance(p, typer.core.TyperOption) and p.metavar is None:
            p.metavar = _metavar(p)
    make_help = command.get_help_option

    def help_option(ctx: Any) -> Any:
        opt = make_help(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    command.get_help_option = help_option
    have = {o for p in command.params for o in getattr(p, "opts", [])}
    command.params.extend(p for p in _global_params() if not have & set(p.opts))


def _usage_line(error: Exception) -> str:
    """A click error as one line: what was wrong and where help is."""
    ctx = getattr(error, "ctx", None)
    msg = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"{msg}{where}"


class VstainGroup(typer.core.TyperGroup):
    """The ``vstain`` group: every error is one ``error:`` line (usage errors exit 2), SIGTERM
    stops like Ctrl-C, and --debug/--quiet/--log-json work before or after the command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            polish(cmd)
        polish(self)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        reset_flags()
        old = _signals_as_interrupt()
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as e:
            e.show()  # the command's help
            code = 2
        except ClickException as e:
            console.print(f"[bold red]error:[/] {_usage_line(e)}", highlight=False, markup=True)
            code = e.exit_code
        except typer.Abort:
            code = 130
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
        if standalone_mode:
            sys.exit(code)
        return code


# Seconds the clean-up after Ctrl-C or SIGTERM may take before the process gives up on it (a stuck clean-up
# must never keep a user waiting: one Ctrl-C stops any command).
CLEANUP_GRACE_S = 15.0


def _give_up(signum: int) -> None:
    """The clean-up after a signal is stuck: say so, show where every thread is, exit at once."""
    import faulthandler

    sys.stderr.write(f"\ninterrupted: clean-up did not finish within {CLEANUP_GRACE_S:g} s; exiting now (a temporary "
                     "output may be left next to the output); where each thread was:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(128 + signum)


def _signals_as_interrupt() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (so temporary files are cleaned up) and start a watchdog
    that ends the process if that clean-up takes over ``CLEANUP_GRACE_S``; returns the old handlers.

    (``train`` installs its own handlers while it runs: a signal checkpoints the current step.)
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        watchdog = threading.Timer(CLEANUP_GRACE_S, _give_up, args=(signum,))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


# ----------------------------------------------------------------------------- errors


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _fail(message: str, code: int) -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    fail(message, code)


def handles_errors(fn: F) -> F:
    """Turn VstainError into one line and exit 2; other errors into one line and exit 1.

    With ``--debug`` the traceback is printed first; the exit code stays the same.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VstainError as e:
            _fail(str(e), 2)
        except Interrupted as e:
            console.print(f"[yellow]interrupted[/]: {e.message}", highlight=False)
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing half-written is left; tile, train and demo resume when rerun")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", 1)
        except Exception as e:  # noqa: BLE001 - last-resort guard for the CLI
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)", 1)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def removes_new_outputs(*paths: Any) -> Iterator[None]:
    """Outputs (files or folders) that did not exist before are removed if the command fails.

    Ctrl-C and SIGTERM keep them: commands that resume (tile, train, demo) keep their work.
    """
    fresh = [Path(p) for p in paths if p is not None and not Path(p).exists()]
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        for p in fresh:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- progress


def progress_mode() -> str:
    """rich (a terminal), log (plain lines), json (--log-json) or quiet (--quiet)."""
    if FLAGS["quiet"]:
        return "quiet"
    if FLAGS["log_json"]:
        return "json"
    if os.environ.get("VSTAIN_PROGRESS") == "1" or _is_tty(sys.stderr):
        return "rich"
    return "log"


def stage_line(name: str, detail: str) -> None:
    """A section header: a rule in a terminal, one plain line in a log."""
    mode = progress_mode()
    if mode == "rich":
        console.rule(f"[bold]{name}[/] [dim]{detail}[/]", align="left")
    elif mode == "json":
        emit_json({"event": "stage", "stage": name, "detail": detail})
    elif mode == "log":
        write_line(f"{time.strftime('%H:%M:%S')} == {name}: {detail}")


class RichBars:
    """The core's Progress protocol drawn as rich progress bars (a terminal, on stderr)."""

    def __init__(self) -> None:
        self.bars = RichProgressDisplay(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.base: dict[str, str] = {}
        self.fields: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []

    def __enter__(self) -> "RichBars":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def start(self, key: str, description: str, total: int | None) -> None:
        self.base[key], self.fields[key] = description, {}
        if key in self.tasks:
            self.bars.reset(self.tasks[key], total=total, description=description, info="")
        else:
            self.tasks[key] = self.bars.add_task(description, total=total, rate="", info="")

    def advance(self, key: str, n: int = 1) -> None:
        task_id = self.tasks.get(key)
        if task_id is None:
            return
        self.bars.advance(task_id, n)
        speed = self.bars._tasks[task_id].speed  # noqa: SLF001 - rich has no public getter
        if speed:
            self.bars.update(task_id, rate=f"{speed:,.1f}/s")

    def update(self, key: str, **fields: Any) -> None:
        task_id = self.tasks.get(key)
        if task_id is None:
            return
        phase = fields.pop("phase", "keep")
        self.fields[key].update(fields)
        info = " ".join(format_field(k, v) for k, v in self.fields[key].items())
        if phase != "keep":
            desc = self.base[key] + (f" [cyan]· {phase}[/]" if phase else "")
            self.bars.update(task_id, description=desc, info=info)
        else:
            self.bars.update(task_id, info=info)

    def finish(self, key: str) -> None:
        task_id = self.tasks.get(key)
        if task_id is not None:
            t = self.bars._tasks[task_id]  # noqa: SLF001
            self.bars.update(task_id, description=self.base.get(key, t.description))
            if t.total is not None:
                self.bars.update(task_id, completed=t.total)

    def info(self, message: str) -> None:
        console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def cli_progress(enabled: bool = True) -> RichBars | LogProgress:
    """The CLI's Progress, by ``progress_mode``: rich bars in a terminal, plain lines in a log, JSON
    with --log-json, warnings only with --quiet (or ``enabled=False``, e.g. non-zero ranks).
    All on stderr; use as a context manager."""
    mode = progress_mode() if enabled else "quiet"
    return RichBars() if mode == "rich" else LogProgress(json_lines=mode == "json", quiet=mode == "quiet")


# ----------------------------------------------------------------------------- run summaries


def val_summary(val: dict[str, Any]) -> str:
    """A run's last validation numbers as one phrase (loss, accuracy, interval coverage, sample L1)."""
    parts = [f"val loss {val['loss']:.4g}" if "loss" in val else ""]
    if "accuracy" in val:
        parts.append(f"val accuracy {val['accuracy']:.3f}")
    if "coverage" in val:
        parts.append(f"val coverage {val['coverage']:.3f} (uncalibrated), width {val['width_255']:.1f}/255")
    if "sample_l1_255" in val:
        parts.append(f"sample L1 {val['sample_l1_255']:.2f}/255")
    return ", ".join(x for x in parts if x)


def resumed_at(result: Any) -> str:
    """`` (resumed at step N)`` for a run that resumed, else empty."""
    return f" (resumed at step {result.start_step})" if result.start_step else ""


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


def protocol_option() -> Any:
    """``--protocol``: fast (the --sampler/--steps given) or paper (DDPM with the model's T steps)."""
    from vstain_cli.diffusion.samplers import PROTOCOLS

    choices = "; ".join(f"{name}: {text}" for name, text in PROTOCOLS.items())
    return typer.Option("fast", "--protocol", metavar="NAME", help=f"Sampling protocol ({choices}).")


# ----------------------------------------------------------------------------- whole-slide options
# Declared once (typer ``Annotated`` aliases) and shared by ``stain`` and ``uncertainty``: the same
# flags, defaults and help in both. Sampling flags left unset take the run's calibration's.


def _sampler_help() -> str:
    from vstain_cli.diffusion.samplers import SAMPLERS

    choices = "; ".join(f"{name}: {spec.summary}" for name, spec in SAMPLERS.items())
    return (f"Sampler of diffusion runs ({choices}). Default: the sampler, steps and eta the run's "
            "calibration.json was made with (so its lambda holds), else ddim; giving any of --sampler, --steps "
            "or --eta overrides all three.")


def _protocol_help() -> str:
    from vstain_cli.diffusion.samplers import PROTOCOLS

    return "Sampling protocol (" + "; ".join(f"{name}: {text}" for name, text in PROTOCOLS.items()) + ")."


def _device_help() -> str:
    from vstain_cli.runtime import DEVICE_CHOICES

    return f"Where to run: {DEVICE_CHOICES} (auto: CUDA, else MPS, else CPU)."


AfSlide = Annotated[Path, typer.Argument(help="AF slide: OME-TIFF/TIFF, QPTIFF, CZI or OME-Zarr (any channel count).")]
ModelRun = Annotated[Path, typer.Option(
    "--model", "-m", help="Trained run folder (runs/NAME), or a bundled run: phantom-diffusion, phantom-regression, "
                          "phantom-pix2pix.")]
Sampler = Annotated[Optional[str], typer.Option("--sampler", metavar="NAME", help=_sampler_help())]
Steps = Annotated[Optional[int], typer.Option(
    "--steps", min=1, max=10_000, metavar="INT",
    help="Sampler steps (default: the calibration's, else the sampler's own, see --sampler).")]
Eta = Annotated[Optional[float], typer.Option(
    "--eta", min=0.0, max=1.0, metavar="FLOAT",
    help="DDIM stochasticity, 0 (deterministic) to 1 (default: the calibration's, else 0).")]
Protocol = Annotated[str, typer.Option("--protocol", metavar="NAME", help=_protocol_help())]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per network call.")]
Overlap = Annotated[Optional[int], typer.Option(
    "--overlap", help="Window overlap in px (default: a quarter window for diffusion, half for regression/pix2pix).")]
Region = Annotated[int, typer.Option(
    "--region", min=64, help="Streaming region size in px (bounds memory; uncertainty holds samples x region^2 x 12 "
                             "bytes).")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE", help=_device_help())]
Seed = Annotated[int, typer.Option("--seed", min=0, metavar="INT",
                                   help="Seed: same seed, same slide; uncertainty's sample k is stain's sample k.")]
Mpp = Annotated[Optional[float], typer.Option(
    "--mpp", help="The slide's µm/px when its file lacks or misstates it (it is resampled to the model's).")]
OutFormat = Annotated[Optional[str], typer.Option(
    "--format", help="tiff (pyramidal TIFF) or zarr (OME-Zarr, NGFF 0.4); default: stain from --out's suffix "
                     "(.tif, .tiff or .zarr), uncertainty tiff.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output of the same kind.")]
