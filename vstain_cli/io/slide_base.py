"""What every slide reader shares: the ``SlideReader`` protocol, path checks, thumbnails.

Format readers (``slides``, ``czi``, ``ngff``, ``resample``) import this module
only, so ``slides.open_af`` can route to all of them without an import cycle.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from vstain_cli.errors import InputError

SUPPORTED_AF_DTYPES = (np.uint8, np.uint16, np.float32)


class SlideReader(Protocol):
    """What every slide reader offers."""

    path: Path
    width: int
    height: int
    channels: int
    dtype: np.dtype
    mpp: float | None
    level_dimensions: list[tuple[int, int]]  # (width, height) per level

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Pixels ``(h, w, channels)`` at ``level``; x, y in that level's pixels."""

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """A downsampled view (long side <= max_size) and its downsample factor."""

    def close(self) -> None:
        """Release file handles."""


class SlideBase:
    """Context-manager and thumbnail plumbing for reader classes."""

    def thumbnail(self, max_size: int, channel_sum: bool = False) -> tuple[np.ndarray, float]:
        return _thumbnail(self, max_size, channel_sum)

    def _blank_and_box(self, x: int, y: int, w: int, h: int, level: int) -> tuple[np.ndarray, tuple | None]:
        """A zero (h, w, channels) region and the part of it inside ``level`` (None when none is)."""
        lw, lh = self.level_dimensions[level]
        return np.zeros((h, w, self.channels), self.dtype), clip_box(x, y, w, h, lw, lh)

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]


def stack_error(path: Path, what: str, sizes: dict[str, int]) -> InputError:
    """The one-line refusal of a time series or z stack: ``what`` (the format) and its T, Z, C sizes."""
    dims = ", ".join(f"{a}={sizes.get(a, 1)}" for a in "TZC")
    return InputError(f"{what} has {dims}: a time series or z stack; vstain reads one 2D plane of C channels "
                      "(T=1, Z=1): export one plane first (e.g. bfconvert -timepoint 0 -z 0)", path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a file", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)


def check_readable(path: Path) -> None:
    """Like ``_check_file`` but a folder (a Zarr store) is allowed too."""
    if not path.exists():
        raise InputError("file not found", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)


def clip_box(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The part (x0, y0, x1, y1) of a box inside a ``width`` x ``height`` image, or None."""
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def _thumbnail(slide: SlideReader, max_size: int, channel_sum: bool = False) -> tuple[np.ndarray, float]:
    """Block-mean thumbnail from the smallest level that is still >= the target size.

    Streams by row bands so memory stays bounded for level-0-only slides.
    ``channel_sum`` returns the sum over channels (h, w, 1) float32: what a
    tissue mask of a 26-channel AF slide needs, at 1/26 of the memory.
    """
    target = max(slide.width, slide.height) / max_size
    factor = max(1, math.ceil(target))
    best = 0
    for i, (w, h) in enumerate(slide.level_dimensions):
        ds = slide.width / w
        if ds <= factor + 1e-6:
            best = i
    lw, lh = slide.level_dimensions[best]
    lds = slide.width / lw
    k = max(1, int(round(factor / lds)))  # block size at that level
    ow, oh = lw // k, lh // k
    out = np.empty((oh, ow, 1 if channel_sum else slide.channels), np.float32)
    band = max(k, (2048 // k) * k)
    for y in range(0, oh * k, band):
        hh = min(band, oh * k - y)
        region = slide.read_region(0, y, ow * k, hh, level=best).astype(np.float32)
        if channel_sum:
            region = region.sum(axis=2, keepdims=True)
        out[y // k : (y + hh) // k] = region.reshape(hh // k, k, ow, k, -1).mean(axis=(1, 3))
    if channel_sum:
        return out, float(lds * k)
    if np.issubdtype(slide.dtype, np.integer):
        out = np.rint(out).astype(slide.dtype)
    return out, float(lds * k)


def check_af_dtype(slide: SlideReader) -> None:
    """InputError (closing the slide) unless its dtype is one AF may have."""
    if slide.dtype not in [np.dtype(d) for d in SUPPORTED_AF_DTYPES]:
        slide.close()
        raise InputError(f"AF dtype {slide.dtype} not supported (uint8, uint16 or float32)", slide.path)
