"""The ``vstain`` command: one Typer app, one module per command.

Command modules import only typer/rich at import time; the core library (and
torch) is imported inside each command, so ``vstain --help`` is instant.
"""

from __future__ import annotations

from typing import Optional

import typer

from vstain_cli import __version__
from vstain_cli.cli.common import VstainGroup

app = typer.Typer(
    name="vstain",
    help="Virtual H&E staining of autofluorescence slides with conditional diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=VstainGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vstain {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vstain: AF -> H&E virtual staining, from slide pairs to scored, stitched slides.

    --debug, --quiet and --log-json work before or after the command name.
    """


def _register() -> None:
    from vstain_cli.cli import calibrate, demo, distill, register, score, stain, synth, tile, train, uncertainty

    app.command("synth", no_args_is_help=True)(synth.synth)
    app.command("register", no_args_is_help=True)(register.register)
    app.command("tile", no_args_is_help=True)(tile.tile)
    app.command("train", no_args_is_help=True)(train.train)
    app.command("distill", no_args_is_help=True)(distill.distill)
    app.command("calibrate", no_args_is_help=True)(calibrate.calibrate)
    app.command("stain", no_args_is_help=True)(stain.stain)
    app.command("uncertainty", no_args_is_help=True)(uncertainty.uncertainty)
    app.command("score", no_args_is_help=True)(score.score)
    app.command("demo")(demo.demo)


_register()


def run() -> None:
    """Console-script entry point."""
    app()
