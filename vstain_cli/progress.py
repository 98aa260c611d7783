"""Progress reporting from the core library, drawn by whoever calls it.

The core never imports rich: long functions take a ``Progress`` and call it; the
CLI passes one that draws rich bars (a terminal) or writes plain or JSON lines
(a log), tests and library users pass nothing.

Also here: ``stop_on_signals``, how a long core function learns that SIGINT or
SIGTERM asked it to stop, so it can keep its work (a checkpoint) and raise
``Interrupted``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Progress(Protocol):
    """Receives progress events from long-running core functions.

    Optional methods (called through the module functions ``update`` and
    ``info``, so older implementations keep working): ``update(key, **fields)``
    attaches numbers (``loss``, ``lr``) or a ``phase`` label ("validation") to a
    task; ``info(message)`` is a line the user should see that is not a warning.
    """

    def start(self, key: str, description: str, total: int | None) -> None:
        """Begin a task named ``key`` with ``total`` steps (None if unknown)."""

    def advance(self, key: str, n: int = 1) -> None:
        """Mark ``n`` more steps of task ``key`` done."""

    def finish(self, key: str) -> None:
        """Task ``key`` is complete (or abandoned)."""

    def warn(self, message: str) -> None:
        """A non-fatal problem the user should see."""


def update(progress: Progress, key: str, **fields: Any) -> None:
    """Attach ``fields`` to task ``key`` (``phase=None`` clears the phase label)."""
    fn = getattr(progress, "update", None)
    if fn is not None:
        fn(key, **fields)


def info(progress: Progress, message: str) -> None:
    """Tell the user something that is not a problem (e.g. "resumed at step 40")."""
    fn = getattr(progress, "info", None)
    if fn is not None:
        fn(message)


class NullProgress:
    """A Progress that ignores everything; warnings and info lines are kept."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, n: int = 1) -> None:
        pass

    def finish(self, key: str) -> None:
        pass

    def update(self, key: str, **fields: Any) -> None:
        pass

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


# ----------------------------------------------------------------------------- stopping on signals


class Interrupted(KeyboardInterrupt):
    """A long task stopped on SIGINT/SIGTERM after keeping its work.

    A KeyboardInterrupt, so ``except Exception`` blocks let it through; the CLI
    prints ``message`` and exits with 128 + ``signum``.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = int(signum)

    def __str__(self) -> str:
        return self.message


class StopFlag:
    """Set by the first SIGINT/SIGTERM; ``signum`` says which."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While inside, SIGINT and SIGTERM set the yielded flag instead of killing.

    The task checks the flag at safe points, saves its work and raises
    ``Interrupted``. A second signal while the flag is set raises
    KeyboardInterrupt at once. Outside the main thread it only yields a flag.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
