"""Output image formats of ``stain`` and ``uncertainty``: pyramidal TIFF or OME-Zarr.

Both writers take the same arguments (strips of rows, size, samples, dtype,
``mpp``, ``metadata``...) and write atomically, so the pipelines only choose one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vstain_cli.errors import InputError
from vstain_cli.io.ngff import is_zarr, write_ngff
from vstain_cli.io.tiff import write_pyramid

OUTPUT_FORMATS = ("tiff", "zarr")
SUFFIX = {"tiff": ".tif", "zarr": ".zarr"}


def writer_for(fmt: str) -> Callable[..., list[tuple[int, int]]]:
    """``write_pyramid`` for "tiff", ``write_ngff`` for "zarr"."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    return write_pyramid if fmt == "tiff" else write_ngff


def check_replaceable(out: str | Path, fmt: str) -> None:
    """An existing output that ``--force`` may replace must be of the same kind (never an unrelated folder)."""
    out = Path(out)
    if not out.exists():
        return
    if fmt == "zarr" and out.is_dir() and not is_zarr(out):
        raise InputError("output exists and is a folder that is not an OME-Zarr image; refusing to replace it", out)
    if fmt == "tiff" and out.is_dir():
        raise InputError("output exists and is a folder; choose another --out for a TIFF", out)
