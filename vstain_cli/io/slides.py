"""Slide readers: one small interface over AF and H&E slides, and the routing to them.

AF: OME-TIFF, QPTIFF and plain TIFF (tifffile, here), CZI (``io/czi``) and
OME-Zarr (``io/ngff``), detected from the file's content (``detect_format``).
H&E: OpenSlide, or tifffile for RGB TIFFs. Every reader returns pixels
channels-last, ``(h, w, C)``, in the source dtype. AF never goes through
OpenSlide: it silently returns channel 0 of a multi-channel TIFF as grey
(docs/data.md).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from vstain_cli.errors import InputError
from vstain_cli.io.slide_base import (  # noqa: F401 - re-exported: the readers' common names
    SUPPORTED_AF_DTYPES,
    SlideBase,
    SlideReader,
    _check_file,
    _check_path,
    _short,
    _thumbnail,
    check_af_dtype,
)

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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


class TiffSlide(SlideBase):
    """A (multi-channel) slide read lazily with tifffile, region by region.

    Layouts: one page with C samples per pixel (contig or planar), or C
    single-sample pages (OME ``CYX``, ImageJ, Akoya/PerkinElmer QPTIFF). Pyramid
    levels come from the series' levels (OME SubIFDs, QPTIFF reduced-resolution
    pages, or top-level reduced pages). ``format`` says which: ``ome-tiff``,
    ``qptiff`` or ``tiff``.
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
        try:
            self._open_levels(levels)
        except BaseException:
            self.close()
            raise
        first = self._levels[0]
        self.width, self.height = self.level_dimensions[0]
        self.channels = first[0].samples if len(first) == 1 else len(first)
        self.dtype = np.dtype(first[0].dtype)
        self.axes = levels[0].axes
        self.format = "qptiff" if self._tif.is_qpi else "ome-tiff" if self._tif.is_ome else "tiff"
        self.mpp = _tiff_mpp(self._tif)

    def _open_levels(self, levels: list) -> None:
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

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        readers = self._levels[level]
        if len(readers) == 1:
            return readers[0].read(x, y, w, h)
        return np.concatenate([r.read(x, y, w, h) for r in readers], axis=2)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Microns per pixel from OME PhysicalSizeX, QPTIFF PixelSizeMicrons, Aperio MPP, or resolution tags."""
    if tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        if m:
            return float(m.group(1))
    page = tif.pages[0]
    desc = page.description or ""
    if tif.is_qpi:
        m = re.search(r"<PixelSizeMicrons>\s*([0-9.eE+-]+)\s*</PixelSizeMicrons>", desc)
        if m and float(m.group(1)) > 0:
            return float(m.group(1))
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


class OpenSlideSlide(SlideBase):
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

    def close(self) -> None:
        self._slide.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA -> RGB on white (transparent = no scan = glass)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


def detect_format(path: str | Path) -> str:
    """``tiff`` (plain, OME or QPTIFF), ``czi``, ``ome-zarr`` or ``unknown``, from the content.

    The suffix decides only for content no reader recognises, so that a damaged
    ``.czi`` or ``.zarr`` gets that format's error rather than a TIFF one.
    """
    from vstain_cli.io.czi import CZI_MAGIC
    from vstain_cli.io.ngff import is_zarr

    path = Path(path)
    if path.is_dir():
        return "ome-zarr" if is_zarr(path) or path.suffix.lower() == ".zarr" else "unknown"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    if head.startswith(CZI_MAGIC):
        return "czi"
    suffix = path.suffix.lower()
    return {".czi": "czi", ".zarr": "ome-zarr"}.get(suffix, "unknown")


def open_af(path: str | Path) -> SlideReader:
    """Open an AF slide of any supported format (detected from the file) and check its dtype."""
    path = Path(path)
    _check_path(path)
    kind = detect_format(path)
    if kind == "czi":
        from vstain_cli.io.czi import CziSlide

        slide: SlideReader = CziSlide(path)
    elif kind == "ome-zarr":
        from vstain_cli.io.ngff import NgffSlide

        slide = NgffSlide(path)
    elif path.is_dir():
        raise InputError("not a file (a folder, and not an OME-Zarr image)", path)
    else:
        slide = TiffSlide(path)
    check_af_dtype(slide)
    return slide


def open_image(path: str | Path) -> SlideReader:
    """Open an image vstain wrote (pyramidal TIFF or OME-Zarr) for reading back."""
    path = Path(path)
    if detect_format(path) == "ome-zarr":
        from vstain_cli.io.ngff import NgffSlide

        return NgffSlide(path)
    return TiffSlide(path)


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
