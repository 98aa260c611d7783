"""Slide readers: one small interface over AF (tifffile) and H&E (OpenSlide, tifffile).

Every reader returns pixels channels-last, ``(h, w, C)``, in the source dtype.
AF never goes through OpenSlide: it silently returns channel 0 of a
multi-channel TIFF as grey (docs/data.md).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile

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


# ----------------------------------------------------------------------------- tifffile


class _PageRegions:
    """Reads rectangles of one TIFF page by decoding only the segments it needs.

    Works for tiled and stripped pages, contiguous or planar samples, any codec
    tifffile knows. Reads use ``os.pread`` so several threads may share it; a
    small LRU cache of decoded segments makes overlapping reads decode once.
    """

    def __init__(self, page: tifffile.TiffPage, fd: int, cache_segments: int = 64):
        self.page = page
        self.fd = fd
        self.decode = page.decode
        self.jpegtables = page.jpegtables
        self.height, self.width = page.imagelength, page.imagewidth
        self.samples = page.samplesperpixel
        self.planar = page.planarconfig == 2 and self.samples > 1
        if page.is_tiled:
            self.seg_h, self.seg_w = page.tilelength, page.tilewidth
        else:
            self.seg_h, self.seg_w = min(page.rowsperstrip, self.height), self.width
        self.nty = math.ceil(self.height / self.seg_h)
        self.ntx = math.ceil(self.width / self.seg_w)
        self.offsets = page.dataoffsets
        self.bytecounts = page.databytecounts
        self.dtype = page.dtype
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(cache_segments, 2 * self.ntx * (self.samples if self.planar else 1))
        self._lock = threading.Lock()

    def _segment(self, index: int) -> np.ndarray:
        with self._lock:
            seg = self._cache.get(index)
            if seg is not None:
                self._cache.move_to_end(index)
                return seg
        count = self.bytecounts[index]
        data = os.pread(self.fd, count, self.offsets[index]) if count else None
        if count and len(data) != count:
            raise InputError("truncated TIFF (tile data past the end of the file)", self.page.parent.filehandle.path)
        seg, _, shape = self.decode(data, index, jpegtables=self.jpegtables)
        if seg is None:  # empty segment
            seg = np.zeros(shape, self.dtype)
        seg = seg.reshape(shape[1], shape[2], shape[3])  # (length, width, contig samples)
        with self._lock:
            self._cache[index] = seg
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return seg

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, samples) for the rectangle; pixels outside the image are 0."""
        out = np.zeros((h, w, self.samples), self.dtype)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        planes = range(self.samples) if self.planar else [None]
        for ty in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for tx in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                sy, sx = ty * self.seg_h, tx * self.seg_w
                ay0, ay1 = max(y0, sy), min(y1, sy + self.seg_h)
                ax0, ax1 = max(x0, sx), min(x1, sx + self.seg_w)
                for p in planes:
                    index = (ty * self.ntx + tx) + (0 if p is None else p * self.nty * self.ntx)
                    seg = self._segment(index)
                    block = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
                    dst = out[ay0 - y : ay1 - y, ax0 - x : ax1 - x]
                    if p is None:
                        dst[...] = block
                    else:
                        dst[..., p] = block[..., 0]
        return out


class TiffSlide:
    """A (multi-channel) slide read lazily with tifffile, region by region.

    Layouts: one page with C samples per pixel (contig or planar), or C
    single-sample pages (OME ``CYX``, ImageJ). Pyramid levels come from the
    series' levels (OME SubIFDs or top-level reduced pages).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as e:  # tifffile raises many kinds for bad files
            raise InputError(f"not a readable TIFF ({_short(e)})", self.path) from None
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        self._levels: list[list[_PageRegions]] = []
        self.level_dimensions: list[tuple[int, int]] = []
        for lvl in levels:
            pages = [p for p in lvl.pages if p is not None]
            pages = [p.aspage() if not isinstance(p, tifffile.TiffPage) else p for p in pages]
            for p in pages:
                if len(p.dataoffsets) and max(o + c for o, c in zip(p.dataoffsets, p.databytecounts)) > size:
                    raise InputError("truncated TIFF (image data past the end of the file)", self.path)
            if len(pages) > 1 and any(p.samplesperpixel != 1 for p in pages):
                raise InputError(f"unsupported TIFF layout (axes {lvl.axes})", self.path)
            self._levels.append([_PageRegions(p, self._fd) for p in pages])
            self.level_dimensions.append((pages[0].imagewidth, pages[0].imagelength))
        first = self._levels[0]
        self.width, self.height = self.level_dimensions[0]
        self.channels = first[0].samples if len(first) == 1 else len(first)
        self.dtype = np.dtype(first[0].dtype)
        self.axes = levels[0].axes
        self.mpp = _tiff_mpp(self._tif)

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        readers = self._levels[level]
        if len(readers) == 1:
            return readers[0].read(x, y, w, h)
        return np.concatenate([r.read(x, y, w, h) for r in readers], axis=2)

    def thumbnail(self, max_size: int, channel_sum: bool = False) -> tuple[np.ndarray, float]:
        return _thumbnail(self, max_size, channel_sum)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    def __enter__(self) -> "TiffSlide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Microns per pixel from OME PhysicalSizeX, Aperio MPP, or resolution tags."""
    if tif.is_ome:
        import re

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        if m:
            return float(m.group(1))
    page = tif.pages[0]
    desc = page.description or ""
    if "MPP = " in desc:
        try:
            return float(desc.split("MPP = ")[1].split("|")[0])
        except ValueError:
            pass
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):
            px_per_unit = num / den
            um_per_unit = 25400.0 if unit == 2 else 10000.0
            mpp = um_per_unit / px_per_unit
            if 0.01 < mpp < 100:  # 72 dpi defaults etc. are not physical sizes
                return mpp
    return None


# ----------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide:
    """An RGB brightfield slide through OpenSlide (SVS, NDPI, MRXS, tiled TIFF, DICOM)."""

    channels = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | Path):
        import openslide

        self.path = Path(path)
        _check_file(self.path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as e:
            raise InputError(f"OpenSlide cannot read it ({_short(e)})", self.path) from None
        self.width, self.height = self._slide.dimensions
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = list(self._slide.level_downsamples)
        props = self._slide.properties
        mpp = props.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self.vendor = props.get("openslide.vendor")

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        ds = self.level_downsamples[level]
        rgba = np.asarray(self._slide.read_region((int(x * ds), int(y * ds)), level, (w, h)))
        return _rgba_to_rgb(rgba)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        return _thumbnail(self, max_size)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "OpenSlideSlide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA -> RGB on white (transparent = no scan = glass)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- helpers


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a file", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)


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


def open_af(path: str | Path) -> TiffSlide:
    """Open an AF slide (tifffile only) and check its dtype."""
    slide = TiffSlide(path)
    if slide.dtype not in [np.dtype(d) for d in SUPPORTED_AF_DTYPES]:
        slide.close()
        raise InputError(f"AF dtype {slide.dtype} not supported (uint8, uint16 or float32)", path)
    return slide


def open_he(path: str | Path) -> SlideReader:
    """Open an H&E slide: OpenSlide first, tifffile for RGB TIFFs OpenSlide cannot read.

    A plain tiled RGB TIFF that OpenSlide opens as "generic-tiff" is read with
    tifffile instead: the same pixels, without OpenSlide's RGBA round trip
    (about 3x faster when tiling). Vendor formats (SVS, NDPI, MRXS, ...) stay
    with OpenSlide.
    """
    path = Path(path)
    _check_file(path)
    try:
        slide = OpenSlideSlide(path)
        if slide.vendor == "generic-tiff":
            try:
                fast = TiffSlide(path)
                if fast.channels == 3 and fast.dtype == np.uint8 and fast.level_dimensions[0] == (slide.width, slide.height):
                    fast.mpp = fast.mpp or slide.mpp
                    slide.close()
                    return fast
                fast.close()
            except InputError:
                pass
        return slide
    except InputError as first:
        try:
            slide = TiffSlide(path)
        except InputError:
            raise first from None
        if slide.channels != 3 or slide.dtype != np.uint8:
            slide.close()
            raise InputError(
                f"not an RGB brightfield slide ({slide.channels} channels of {slide.dtype})", path
            ) from None
        return slide
