"""Progress reporting from the core library, drawn by whoever calls it.

The core never imports rich: long functions take a ``Progress`` and call it; the
CLI passes one that draws rich bars, tests and library users pass nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress events from long-running core functions."""

    def start(self, key: str, description: str, total: int | None) -> None:
        """Begin a task named ``key`` with ``total`` steps (None if unknown)."""

    def advance(self, key: str, n: int = 1) -> None:
        """Mark ``n`` more steps of task ``key`` done."""

    def finish(self, key: str) -> None:
        """Task ``key`` is complete (or abandoned)."""

    def warn(self, message: str) -> None:
        """A non-fatal problem the user should see."""


class NullProgress:
    """A Progress that ignores everything; warnings are kept in ``warnings``."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, n: int = 1) -> None:
        pass

    def finish(self, key: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)
