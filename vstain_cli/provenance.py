"""How an output was made: file fingerprints, version, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from vstain_cli import __version__
from vstain_cli.errors import InputError, OutputExistsError, VstainError

_FINGERPRINT_CHUNK = 1 << 20


def fingerprint(path: str | Path) -> dict[str, Any]:
    """A fast fingerprint of a (possibly gigapixel) file.

    SHA-256 over the size and the first and last MiB: cheap on 10 GB slides and
    still changes when the file is replaced or truncated.
    """
    path = Path(path)
    if path.is_dir():
        return _fingerprint_folder(path)
    try:
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(_FINGERPRINT_CHUNK))
            if size > 2 * _FINGERPRINT_CHUNK:
                f.seek(size - _FINGERPRINT_CHUNK)
                h.update(f.read(_FINGERPRINT_CHUNK))
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path) from None
    return {"name": path.name, "bytes": size, "sha256_head_tail": h.hexdigest()}


def _fingerprint_folder(path: Path) -> dict[str, Any]:
    """A folder input (an OME-Zarr store): SHA-256 over every file's relative name and size, and the
    content of its small metadata files (``.zattrs``, ``.zarray``, ``zarr.json``...)."""
    h = hashlib.sha256()
    total = 0
    try:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            size = f.stat().st_size
            total += size
            h.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
            if f.name.startswith(".z") or f.name.endswith(".json"):
                h.update(f.read_bytes()[:_FINGERPRINT_CHUNK])
    except OSError as e:
        raise InputError(f"cannot read folder ({e.strerror or e})", path) from None
    return {"name": path.name, "bytes": total, "sha256_head_tail": h.hexdigest()}


def environment() -> dict[str, str]:
    """The software that made an output."""
    return {
        "vstain": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def record(config: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A provenance record: command config, inputs' fingerprints, software, time."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "inputs": inputs or {},
        "software": environment(),
    }


TMP_MARK = ".partial-"  # every temporary output is named ``.NAME.partial-PID`` next to its final path


def tmp_name(path: Path) -> Path:
    """The temporary sibling an output is written to before its rename (the one temp-name rule)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def stale_tmp_names(folder: Path) -> list[Path]:
    """Temporary outputs in ``folder`` left by killed runs (any process id)."""
    return sorted(folder.glob(f".*{TMP_MARK}*")) if folder.is_dir() else []


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_path(tmp: Path, path: Path) -> None:
    """Rename a finished ``tmp`` (file or folder) onto ``path``, replacing what is there.

    A folder cannot be renamed onto a non-empty one, so an old ``path`` is moved aside
    first and removed after; the caller checked ``--force``.
    """
    old = None
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        remove_path(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the old output back
        raise
    if old is not None:
        remove_path(old)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename onto ``path`` on success.

    The caller creates a file or a folder at the yielded path. On any exception
    (Ctrl-C included) it is removed, so an output is either complete or absent.
    """
    path = Path(path)
    tmp = tmp_name(path)
    remove_path(tmp)
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_output_file(path: str | Path, force: bool, inputs: list[Path] = ()) -> Path:
    """Refuse to overwrite an existing output without ``force``, or an input ever."""
    path = Path(path)
    for src in inputs:
        if path.resolve() == Path(src).resolve():
            raise InputError("output path is the input file; choose another --out", path)
    if path.exists() and not force:
        raise OutputExistsError("output exists; pass --force to overwrite it", path)
    ensure_writable_dir(path.parent)
    return path


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VstainError(f"cannot create output folder ({e.strerror or e})", folder) from None
    probe = folder / f".vstain-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise VstainError(f"output folder is not writable ({e.strerror or e})", folder) from None
    return folder


def read_format_json(
    path: str | Path, fmt: str, *, missing: tuple[str, str | Path], corrupt: str, wrong: str
) -> dict[str, Any]:
    """Read a vstain JSON record whose ``format`` field must be ``fmt``.

    Errors are InputErrors: ``missing`` = (message, path to name) when the file
    does not exist, ``corrupt (reason)`` when it does not parse, ``wrong`` when
    it is not a record of this format.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(missing[0], missing[1]) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{corrupt} ({e})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise InputError(wrong, path)
    return obj
