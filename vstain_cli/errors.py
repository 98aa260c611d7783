"""Errors the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class VstainError(Exception):
    """A problem with the user's input: reported as one line, exit code 2.

    ``path`` names the file or folder at fault (may be None).
    """

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InputError(VstainError):
    """Unreadable, malformed or inconsistent input."""


class OutputExistsError(VstainError):
    """An output exists and ``--force`` was not given."""


@contextmanager
def input_errors(path: str | Path | None = None) -> Iterator[None]:
    """At a pipeline entry point: an algorithm's ValueError/TypeError becomes a one-line InputError."""
    try:
        yield
    except VstainError:
        raise
    except (ValueError, TypeError) as e:
        raise InputError(str(e), path) from None
