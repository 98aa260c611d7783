"""Zeiss CZI (Axioscan, ZEN) AF slides through pylibCZIrw, Zeiss's own libCZI binding.

pylibCZIrw rather than czifile: it reads any rectangle of a plane by decoding
only the subblocks under it (JPEG-XR and zstd included), composes multi-scene
and multi-tile mosaics, reads reduced resolutions from the file's pyramid
subblocks (``zoom``), and writes CZI too, so tests make real files with the
same library. Imported only when a CZI is opened (``vstain --help`` stays fast).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from vstain_cli.errors import InputError
from vstain_cli.io.slide_base import SlideBase, _check_file, _short, stack_error

CZI_MAGIC = b"ZISRAWFILE"
_DTYPES = {"Gray8": np.uint8, "Gray16": np.uint16, "Gray32Float": np.float32}


class CziSlide(SlideBase):
    """A multi-channel CZI read lazily, one channel plane at a time (C planes = AF channels)."""

    format = "czi"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        try:
            from pylibCZIrw import czi as pyczi
        except ImportError:  # pragma: no cover - a declared dependency
            raise InputError("reading CZI needs pylibCZIrw (pip install pylibCZIrw)", self.path) from None
        try:
            self._reader = pyczi.CziReader(str(self.path))
            box = self._reader.total_bounding_box_no_pyramid
            types = self._reader.pixel_types
            meta = self._reader.metadata
        except Exception as e:  # libCZI raises RuntimeError and friends for bad files
            raise InputError(f"not a readable CZI ({_short(e)})", self.path) from None
        self._lock = threading.Lock()
        self.x0, x1 = box["X"]
        self.y0, y1 = box["Y"]
        self.width, self.height = x1 - self.x0, y1 - self.y0
        sizes = {dim: n for dim, (_, n) in box.items() if dim not in "XY"}
        if sizes.get("T", 1) > 1 or sizes.get("Z", 1) > 1:
            self.close()
            raise stack_error(self.path, "CZI", sizes)
        others = {d: n for d, n in sizes.items() if d not in "TZCSM" and n > 1}  # phases, rotations, views ...
        if others:
            self.close()
            raise InputError(f"CZI has more than one plane along {', '.join(f'{d}={n}' for d, n in others.items())}; "
                             "vstain reads one 2D plane of C channels", self.path)
        self.channels = sizes.get("C", 1)
        kinds = set(types.values())
        if any(k.startswith("Bgr") for k in kinds):
            self.close()
            raise InputError(f"looks like an RGB H&E (brightfield) slide (pixel type {'/'.join(sorted(kinds))}), "
                             "not grey AF (Gray8, Gray16 or Gray32Float)", self.path)
        if len(kinds) != 1 or next(iter(kinds)) not in _DTYPES:
            self.close()
            raise InputError(f"CZI pixel type {'/'.join(sorted(kinds))} is not grey AF "
                             "(Gray8, Gray16 or Gray32Float)", self.path)
        self.dtype = np.dtype(_DTYPES[next(iter(kinds))])
        self.mpp = _czi_mpp(meta)
        self.level_dimensions = [(self.width, self.height)]
        if self._has_pyramid():
            w, h = self.width, self.height
            while max(w, h) >= 1024 and min(w, h) >= 4:
                w, h = w // 2, h // 2
                self.level_dimensions.append((w, h))

    def _has_pyramid(self) -> bool:
        found: list[bool] = []

        def visit(index: int, info) -> bool:
            if info.get_zoom() < 0.99:
                found.append(True)
                return False  # stop
            return True

        self._reader.enumerate_subblocks(visit)
        return bool(found)

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        out, box = self._blank_and_box(x, y, w, h, level)
        if box is None:
            return out
        bx0, by0, bx1, by1 = box
        ds = 2**level
        roi = (self.x0 + bx0 * ds, self.y0 + by0 * ds, (bx1 - bx0) * ds, (by1 - by0) * ds)
        for c in range(self.channels):
            with self._lock:
                plane = self._reader.read(roi=roi, plane={"C": c}, zoom=1.0 / ds if ds > 1 else None)
            plane = plane[: by1 - by0, : bx1 - bx0, 0]  # libCZI may round a zoomed size up by one
            out[by0 - y : by0 - y + plane.shape[0], bx0 - x : bx0 - x + plane.shape[1], c] = plane
        return out

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
            self._reader = None


def _czi_mpp(meta: dict) -> float | None:
    """µm/px from ImageDocument/Metadata/Scaling (CZI stores metres per pixel)."""
    try:
        items = meta["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
        items = items if isinstance(items, list) else [items]
        value = next(float(d["Value"]) for d in items if d.get("@Id") == "X")
    except (KeyError, TypeError, ValueError, StopIteration):
        return None
    if value <= 0:
        return None
    return value * 1e6 if value < 1e-3 else value  # metres per the schema; some writers store µm
