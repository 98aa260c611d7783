"""Streaming writer of tiled, compressed, pyramidal TIFFs.

Level 0 is consumed strip by strip from an iterator; every reduced level is
spilled to a temporary memory-mapped file next to the output while the level
above it is written, so memory stays bounded by a few strips whatever the
slide size (docs/architecture.md, "Streaming").

Two layouts:
- ``subifds=False``: every level is a top-level IFD (reduced levels marked
  ``subfiletype=1``). OpenSlide (generic TIFF), QuPath and libvips see all
  levels; OpenSlide reports the mpp from the resolution tags.
- ``subifds=True``: reduced levels are SubIFDs of level 0, the OME-TIFF
  pyramid convention (used for multi-channel AF, which OpenSlide never reads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import tifffile

from vstain_cli.provenance import atomic_output, remove_path

DEFAULT_TILE = 256


def level_shapes(height: int, width: int, min_size: int = 512, factor: int = 2) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level: halve until the long side < ``min_size``."""
    shapes = [(height, width)]
    while max(shapes[-1]) >= 2 * min_size and min(shapes[-1]) >= 2 * factor:
        h, w = shapes[-1]
        shapes.append((h // factor, w // factor))
    return shapes


def _rechunk(strips: Iterable[np.ndarray], rows: int, height: int, width: int, samples: int) -> Iterator[np.ndarray]:
    """Regroup strips of any heights into bands of exactly ``rows`` rows (last may be short)."""
    pending: list[np.ndarray] = []
    have = 0
    seen = 0
    for strip in strips:
        strip = np.asarray(strip)
        if strip.ndim == 2:
            strip = strip[:, :, None]
        if strip.shape[1:] != (width, samples):
            raise ValueError(f"strip of shape {strip.shape} does not match image width {width} x {samples}")
        seen += strip.shape[0]
        if seen > height:
            raise ValueError(f"strips give more than {height} rows")
        pending.append(strip)
        have += strip.shape[0]
        while have >= rows:
            band = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
            yield band[:rows]
            rest = band[rows:]
            pending = [rest] if rest.shape[0] else []
            have = rest.shape[0]
    if seen != height:
        raise ValueError(f"strips gave {seen} rows, expected {height}")
    if have:
        yield np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]


def _downsample2(band: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample of an (h, w, s) band (odd last row/col dropped)."""
    h, w = band.shape[0] // 2 * 2, band.shape[1] // 2 * 2
    b = band[:h, :w].astype(np.float32)
    out = (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]) * 0.25
    if np.issubdtype(band.dtype, np.integer):
        out = np.rint(out)
    return out.astype(band.dtype)


class _LevelSpill:
    """The next pyramid level, filled band by band into a temporary memmap."""

    def __init__(self, path: Path, shape: tuple[int, int], samples: int, dtype: np.dtype):
        self.path = path
        self.shape = shape
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(*shape, samples))
        self.row = 0

    def add(self, band: np.ndarray) -> None:
        small = _downsample2(band)
        n = min(small.shape[0], self.shape[0] - self.row)
        if n > 0:
            self.array[self.row : self.row + n] = small[:n, : self.shape[1]]
            self.row += n

    def strips(self, rows: int) -> Iterator[np.ndarray]:
        self.array.flush()
        for y in range(0, self.shape[0], rows):
            yield np.asarray(self.array[y : y + rows])

    def close(self) -> None:
        del self.array
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _tiles(bands: Iterable[np.ndarray], tile: int, width: int, spill: _LevelSpill | None) -> Iterator[np.ndarray]:
    """Cut bands of ``tile`` rows into tiles in row-major order, feeding the next level."""
    for band in bands:
        if spill is not None:
            spill.add(band)
        for x in range(0, width, tile):
            yield band[:, x : x + tile]


def write_pyramid(
    path: str | Path,
    strips: Iterable[np.ndarray],
    height: int,
    width: int,
    samples: int,
    dtype: Any = np.uint8,
    *,
    mpp: float | None = None,
    tile: int = DEFAULT_TILE,
    compression: str | None = "jpeg",
    quality: int = 90,
    photometric: str | None = None,
    subifds: bool = False,
    min_level_size: int = 512,
    metadata: dict[str, Any] | None = None,
    ome_channels: list[str] | None = None,
    maxworkers: int | None = None,
) -> list[tuple[int, int]]:
    """Stream ``strips`` (row bands of shape (h, width, samples)) into a pyramidal TIFF.

    The file appears at ``path`` only when complete (temporary name + rename).
    ``metadata`` (provenance) is stored as JSON in the ImageDescription of level
    0 (or in the OME-XML of an OME pyramid). Returns the level shapes written.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    shapes = level_shapes(height, width, min_level_size)
    if photometric is None:
        photometric = "rgb" if samples == 3 and dtype == np.uint8 else "minisblack"
    if compression == "jpeg" and not (dtype == np.uint8 and samples in (1, 3)):
        compression = "zlib"
    comp_args: dict[str, Any] = {}
    if compression == "jpeg":
        comp_args = {"level": quality}
    elif compression in ("zlib", "deflate", "adobe_deflate"):
        compression, comp_args = "zlib", {"level": 1}
    elif compression == "zstd":
        comp_args = {"level": 1}
    resolution = None
    if mpp:
        px_per_cm = 1e4 / mpp
        resolution = (px_per_cm, px_per_cm)
    meta = dict(metadata or {})
    if mpp:
        meta.setdefault("mpp", mpp)

    with atomic_output(path) as tmp:
        spills: list[_LevelSpill] = []
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=bool(ome_channels) and subifds) as tif:
                source: Iterable[np.ndarray] = strips
                for level, (h, w) in enumerate(shapes):
                    nxt = None
                    if level + 1 < len(shapes):
                        nxt = _LevelSpill(
                            tmp.with_name(tmp.name + f".level{level + 1}.npy"), shapes[level + 1], samples, dtype
                        )
                        spills.append(nxt)
                    bands = _rechunk(source, tile, h, w, samples)
                    kwargs: dict[str, Any] = dict(
                        shape=(h, w, samples) if samples > 1 else (h, w),
                        dtype=dtype,
                        tile=(tile, tile),
                        photometric=photometric,
                        planarconfig="contig" if samples > 1 else None,
                        compression=compression,
                        compressionargs=comp_args or None,
                        maxworkers=maxworkers,
                    )
                    if resolution:
                        f = width / w
                        kwargs.update(resolution=(resolution[0] / f, resolution[1] / f), resolutionunit="CENTIMETER")
                    if level == 0:
                        if subifds and len(shapes) > 1:
                            kwargs["subifds"] = len(shapes) - 1
                        if ome_channels and subifds:
                            om: dict[str, Any] = {"axes": "YXS" if samples > 1 else "YX"}
                            if mpp:
                                om.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm",
                                          PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
                            kwargs["metadata"] = om
                            kwargs["description"] = None
                            kwargs["extratags"] = []
                        else:
                            kwargs["metadata"] = None
                            kwargs["description"] = json.dumps({"vstain": meta}, default=str)
                    else:
                        kwargs["subfiletype"] = 1
                        kwargs["metadata"] = None
                    tile_iter = _tiles(bands, tile, w, nxt)
                    if samples == 1:
                        tile_iter = (t[:, :, 0] for t in tile_iter)
                    tif.write(tile_iter, **kwargs)
                    if nxt is not None:
                        source = nxt.strips(tile * 4)
            if ome_channels and subifds:
                _append_vstain_metadata(tmp, meta)
        finally:
            for s in spills:
                s.close()
    return shapes


def _append_vstain_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Add vstain provenance to an OME-TIFF's OME-XML as an XML comment.

    The comment keeps the OME-XML valid for Bio-Formats/QuPath while the JSON
    stays readable by ``read_provenance``.
    """
    desc = tifffile.tiffcomment(path)
    if desc and "</OME>" in desc:
        blob = json.dumps({"vstain": meta}, default=str).replace("--", "- -")
        desc = desc.replace("</OME>", f"<!-- vstain-provenance {blob} --></OME>", 1)
        tifffile.tiffcomment(path, desc.encode("utf-8"))


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The vstain provenance stored by ``write_pyramid`` (empty dict if none)."""
    with tifffile.TiffFile(path) as tif:
        desc = tif.pages[0].description or ""
    if desc.startswith("{"):
        try:
            return json.loads(desc).get("vstain", {})
        except ValueError:
            return {}
    marker = "<!-- vstain-provenance "
    i = desc.find(marker)
    if i >= 0:
        j = desc.find(" -->", i)
        try:
            return json.loads(desc[i + len(marker) : j]).get("vstain", {})
        except ValueError:
            return {}
    return {}


class _Aborted(Exception):
    """The producer of ``write_pyramids`` failed or was interrupted: writers stop at once."""


def write_pyramids(specs: list[dict[str, Any]], strips: Iterable[tuple[np.ndarray, ...]], queue_size: int = 3) -> None:
    """Write several pyramids from one stream of strip tuples, each in its own thread.

    ``specs[i]`` holds the ``write_pyramid`` arguments (``path``, ``height``,
    ``width``, ``samples``, ``dtype`` and options; ``writer`` another writer
    with the same arguments) for the ``i``-th element of every tuple yielded by
    ``strips``. Memory stays bounded by ``queue_size`` strips per output. On any
    error, Ctrl-C included, every writer stops within a strip and no output is
    left behind (a finished one is removed too).
    """
    import queue
    import threading

    queues: list[queue.Queue] = [queue.Queue(maxsize=queue_size) for _ in specs]
    errors: list[BaseException] = []
    abort = threading.Event()
    done = object()

    def consume(q: queue.Queue) -> Iterator[np.ndarray]:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if abort.is_set():
                    raise _Aborted from None
                continue
            if item is done:
                if abort.is_set():  # the stream ended early: never publish a short image
                    raise _Aborted
                return
            yield item

    def worker(spec: dict[str, Any], q: queue.Queue) -> None:
        try:
            spec = dict(spec)
            writer = spec.pop("writer", write_pyramid)  # e.g. io/ngff.write_ngff (same arguments)
            writer(spec.pop("path"), consume(q), spec.pop("height"), spec.pop("width"),
                   spec.pop("samples"), spec.pop("dtype", np.uint8), **spec)
        except _Aborted:
            pass
        except BaseException as e:  # surfaced in the caller's thread
            errors.append(e)
            abort.set()

    def put(q: queue.Queue, t: threading.Thread, item: Any) -> None:
        """Put unless the writer is gone (a full queue of a dead writer would block forever)."""
        while t.is_alive():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=worker, args=(s, q), daemon=True) for s, q in zip(specs, queues)]
    for t in threads:
        t.start()
    try:
        for parts in strips:
            if abort.is_set():
                break
            for q, t, part in zip(queues, threads, parts):
                put(q, t, part)
    except BaseException as e:
        errors.insert(0, e)  # the producer's own error (e.g. KeyboardInterrupt) is the one to raise
        abort.set()
    finally:
        for q, t in zip(queues, threads):
            put(q, t, done)
        for t in threads:
            t.join()
    if errors:
        for s in specs:  # an output whose writer finished before the failure is removed too
            remove_path(Path(s["path"]))
        raise errors[0]
