"""Progress reporting from the core library, drawn by whoever calls it.

One protocol, three implementations: ``NullProgress`` (tests and library users;
it keeps warnings), ``LogProgress`` (plain or JSON lines on stderr, for logs and
pipes) and ``cli.common.RichBars`` (rich bars in a terminal; the core never imports
rich). ``WarningLog`` wraps any of them to collect the warnings a function emitted.

Also here: ``stop_on_signals``, how a long core function learns that SIGINT or
SIGTERM asked it to stop, so it can keep its work (a checkpoint) and raise
``Interrupted``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol


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


class WarningLog:
    """Forwards every event to ``inner`` and keeps the distinct warnings in ``warnings``."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self.warnings: list[str] = []

    def start(self, key: str, description: str, total: int | None) -> None:
        self.inner.start(key, description, total)

    def advance(self, key: str, n: int = 1) -> None:
        self.inner.advance(key, n)

    def finish(self, key: str) -> None:
        self.inner.finish(key)

    def update(self, key: str, **fields: Any) -> None:
        update(self.inner, key, **fields)

    def info(self, message: str) -> None:
        info(self.inner, message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
        self.inner.warn(message)


# ----------------------------------------------------------------------------- plain lines

_write_lock = threading.Lock()


def write_line(line: str, stream: IO[str] | None = None) -> None:
    """One line on ``stream`` (default stderr: stdout is for results), whole even across threads."""
    stream = stream or sys.stderr
    with _write_lock:
        stream.write(line + "\n")
        stream.flush()


def emit_json(event: dict[str, Any], stream: IO[str] | None = None) -> None:
    """One JSON object per line, stamped with the time."""
    write_line(json.dumps({"time": round(time.time(), 3), **event}), stream)


def clock(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_field(k: str, v: Any) -> str:
    """``loss 0.1234``: a task's number as a progress line shows it."""
    return f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"


class _Task:
    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total = description, total
        self.done = 0
        self.t0 = time.monotonic()
        self.fields: dict[str, Any] = {}
        self.phase: str | None = None

    def numbers(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        eta = (self.total - self.done) / rate if rate and self.total is not None else None
        return {"done": self.done, "total": self.total, "elapsed_s": round(elapsed, 1),
                "rate": None if rate is None else round(rate, 3), "eta_s": None if eta is None else round(eta, 1)}

    def line(self, finished: bool = False) -> str:
        n = self.numbers()
        count = f"{n['done']}/{n['total']}" if n["total"] is not None else f"{n['done']}"
        parts = [f"{self.description}: {'done ' if finished else ''}{count}"]
        if n["total"] and not finished:
            parts.append(f"{100 * n['done'] / n['total']:.0f}%")
        if n["rate"]:
            parts.append(f"{n['rate']:.3g}/s")
        if finished:
            parts.append(f"in {clock(n['elapsed_s'])}")
        elif n["eta_s"] is not None:
            parts.append(f"eta {clock(n['eta_s'])}")
        parts += [format_field(k, v) for k, v in self.fields.items()]
        if self.phase and not finished:
            parts.append(f"[{self.phase}]")
        return " ".join(parts)


class LogProgress:
    """Progress as plain lines (``json_lines=False``) or JSON objects on stderr, never wrapped.

    A line every ``interval`` seconds (VSTAIN_PROGRESS_INTERVAL, default 30) for
    the running tasks, and one at each stage boundary: a task's end, a phase
    (validation, sample grid, checkpoint), an info message. ``quiet`` prints
    warnings only. A context manager (the periodic line runs in a thread).
    """

    def __init__(self, json_lines: bool = False, quiet: bool = False, interval: float | None = None,
                 stream: IO[str] | None = None) -> None:
        self.json, self.quiet, self.stream = json_lines, quiet, stream
        self.interval = interval if interval is not None else float(os.environ.get("VSTAIN_PROGRESS_INTERVAL", 30))
        self.tasks: dict[str, _Task] = {}
        self.finished_at: dict[str, float] = {}
        self.last = ""  # description of the latest task started or finished
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LogProgress":
        if not self.quiet:
            self._thread = threading.Thread(target=self._beat, name="vstain-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.heartbeat()

    def _line(self, text: str) -> None:
        write_line(f"{time.strftime('%H:%M:%S')} {text}", self.stream)

    def heartbeat(self) -> None:
        """Write the state of every running task (one line, or one JSON object per task)."""
        with self._lock:  # a task at its total that was never finished has nothing more to say
            tasks = [(k, t) for k, t in self.tasks.items() if t.total is None or t.done < t.total or t.phase]
        if self.quiet:
            return
        if not tasks:  # between tasks (writing, bootstrap): say it is alive, and after what
            if self.json:
                emit_json({"event": "heartbeat", "after": self.last}, self.stream)
            else:
                self._line(f"working (after: {self.last or 'start'})")
            return
        if self.json:
            for key, t in tasks:
                self._json("progress", key, t)
        else:
            self._line(" | ".join(t.line() for _, t in tasks))

    def _json(self, event: str, key: str, t: _Task) -> None:
        emit_json({"event": event, "task": key, "description": t.description, **t.numbers(),
                   "phase": t.phase, **t.fields}, self.stream)

    def start(self, key: str, description: str, total: int | None) -> None:
        t = _Task(description, total)
        with self._lock:
            self.tasks[key] = t
        self.last = description
        if self.json and not self.quiet:
            self._json("start", key, t)

    def advance(self, key: str, n: int = 1) -> None:
        t = self.tasks.get(key)
        if t is not None:
            t.done += n

    def update(self, key: str, **fields: Any) -> None:
        t = self.tasks.get(key)
        if t is None:
            return
        phase = fields.pop("phase", t.phase)
        t.fields.update(fields)
        if phase != t.phase:
            t.phase = phase
            if phase and not self.quiet:
                if self.json:
                    self._json("phase", key, t)
                else:
                    self._line(t.line())

    def finish(self, key: str) -> None:
        with self._lock:
            t = self.tasks.pop(key, None)
        if t is None or self.quiet:
            return
        self.last = t.description
        now = time.monotonic()
        if self.json:
            self._json("finish", key, t)
        elif now - self.finished_at.get(key, -1e9) >= self.interval:  # per-region tasks: at most one a period
            self._line(t.line(finished=True))
            self.finished_at[key] = now

    def info(self, message: str) -> None:
        if self.quiet:
            return
        if self.json:
            emit_json({"event": "info", "message": message}, self.stream)
        else:
            self._line(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self.json:  # stderr stays one JSON object per line
            emit_json({"event": "warning", "message": message}, self.stream)
        else:
            write_line(f"warning: {message}", self.stream)


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
