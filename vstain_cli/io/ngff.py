"""OME-Zarr (OME-NGFF) images: a lazy multi-channel reader and a streaming pyramid writer.

Reading goes through ``zarr`` directly and accepts NGFF 0.4 (Zarr v2 stores,
``multiscales`` in ``.zattrs``) and 0.5 (Zarr v3, under ``ome`` in
``zarr.json``), and bioformats2raw's layout (the image in ``0/``). Axes ``t``
and ``z`` must have one plane; ``c`` (if any) gives the AF channels.

Writing produces NGFF 0.4 on Zarr v2, the version napari-ome-zarr, vizarr,
Neuroglancer and Bio-Formats all read today: a ``c, y, x`` multiscale with µm
scales in each level's coordinate transformations, Blosc-zstd chunks of one
tile, levels halved like ``io/tiff.write_pyramid``'s. Strips stream in and every
level is written chunk row by chunk row (memory: one chunk row per level), into
a temporary folder renamed onto the output when complete (``provenance.atomic_output``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vstain_cli.errors import InputError
from vstain_cli.io.slide_base import SlideBase, _short, check_readable
from vstain_cli.io.tiff import DEFAULT_TILE, _downsample2, _rechunk, level_shapes
from vstain_cli.provenance import atomic_output

NGFF_VERSION = "0.4"
_UNIT_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
            "angstrom": 1e-4}


def is_zarr(path: Path) -> bool:
    """A folder holding Zarr v2 or v3 metadata."""
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup"))


def _multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]  # NGFF 0.5
    ms = attrs.get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _scale_of(transforms: list[dict[str, Any]] | None, ndim: int) -> np.ndarray:
    scale = np.ones(ndim)
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], float)
    return scale


class NgffSlide(SlideBase):
    """An OME-Zarr image read lazily, chunk by chunk, with its multiscale levels."""

    format = "ome-zarr"

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        check_readable(self.path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            ms = _multiscales(dict(group.attrs))
            if ms is None and "bioformats2raw.layout" in (dict(group.attrs).get("ome") or dict(group.attrs)):
                group = group["0"]  # bioformats2raw: the first image of the series
                ms = _multiscales(dict(group.attrs))
            if ms is None:
                raise InputError("not an OME-Zarr image (no multiscales metadata)", self.path)
            m = ms[0]
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in m.get("axes", ["t", "c", "z", "y", "x"])]
            units = {a["name"]: a.get("unit") for a in m.get("axes", []) if isinstance(a, dict)}
            self._arrays = [group[d["path"]] for d in m["datasets"]]
            scales = [_scale_of(d.get("coordinateTransformations"), len(axes)) for d in m["datasets"]]
            top = _scale_of(m.get("coordinateTransformations"), len(axes))
        except InputError:
            raise
        except Exception as e:  # zarr, JSON and key errors for damaged stores
            raise InputError(f"not a readable OME-Zarr ({_short(e)})", self.path) from None
        if not {"y", "x"} <= set(axes) or len(axes) != self._arrays[0].ndim:
            raise InputError(f"unsupported OME-Zarr axes {axes} for arrays of {self._arrays[0].ndim} dims", self.path)
        for name in ("t", "z"):
            if name in axes and self._arrays[0].shape[axes.index(name)] != 1:
                raise InputError(f"OME-Zarr has {self._arrays[0].shape[axes.index(name)]} {name} planes; "
                                 "vstain reads 2D multi-channel images", self.path)
        self.axes = axes
        self._iy, self._ix = axes.index("y"), axes.index("x")
        self._ic = axes.index("c") if "c" in axes else None
        shape0 = self._arrays[0].shape
        self.channels = shape0[self._ic] if self._ic is not None else 1
        self.dtype = np.dtype(self._arrays[0].dtype)
        self.level_dimensions = [(a.shape[self._ix], a.shape[self._iy]) for a in self._arrays]
        self.width, self.height = self.level_dimensions[0]
        sx = float(scales[0][self._ix] * top[self._ix])
        unit = units.get("x")
        factor = _UNIT_UM.get(unit) if unit else (None if sx == 1.0 else 1.0)
        self.mpp = sx * factor if factor else None

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        out, box = self._blank_and_box(x, y, w, h, level)
        if box is None:
            return out
        x0, y0, x1, y1 = box
        index: list[Any] = [0] * len(self.axes)
        index[self._iy], index[self._ix] = slice(y0, y1), slice(x0, x1)
        order = [self._iy, self._ix]
        if self._ic is not None:
            index[self._ic] = slice(None)
            order.append(self._ic)
        block = np.asarray(self._arrays[level][tuple(index)])
        # the remaining axes are in array order; put them in (y, x, c) order
        kept = sorted(order)
        block = block.transpose([kept.index(a) for a in order])
        if self._ic is None:
            block = block[..., None]
        out[y0 - y : y1 - y, x0 - x : x1 - x] = block
        return out

    def close(self) -> None:
        self._arrays = []


# ----------------------------------------------------------------------------- writer


class _Level:
    """One level of the output: chunk-row-aligned writes, reduced rows passed to the next level."""

    def __init__(self, array, rows: int, nxt: "_Level | None"):
        self.array, self.rows, self.nxt = array, rows, nxt
        self.height = array.shape[1]
        self.y = 0
        self.pending: list[np.ndarray] = []
        self.have = 0

    def add(self, band: np.ndarray) -> None:
        self.pending.append(band)
        self.have += band.shape[0]
        while self.have >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        block = np.concatenate(self.pending, axis=0) if len(self.pending) > 1 else self.pending[0]
        head, rest = block[:n], block[n:]
        self.pending = [rest] if rest.shape[0] else []
        self.have = rest.shape[0]
        n = min(n, self.height - self.y)
        if n > 0:
            self.array[:, self.y : self.y + n, :] = np.ascontiguousarray(head[:n].transpose(2, 0, 1))
            self.y += n
        if self.nxt is not None and head.shape[0] >= 2:
            self.nxt.add(_downsample2(head)[:, : self.nxt.array.shape[2]])

    def finish(self) -> None:
        if self.have:
            self._flush(self.have)
        if self.nxt is not None:
            self.nxt.finish()


def write_ngff(
    path: str | Path,
    strips: Iterable[np.ndarray],
    height: int,
    width: int,
    samples: int,
    dtype: Any = np.uint8,
    *,
    mpp: float | None = None,
    tile: int = DEFAULT_TILE,
    min_level_size: int = 512,
    metadata: dict[str, Any] | None = None,
    channel_names: list[str] | None = None,
    compression: str | None = "zstd",
    **_: Any,
) -> list[tuple[int, int]]:
    """Stream ``strips`` (row bands (h, width, samples)) into an OME-Zarr multiscale image at ``path``.

    Takes ``write_pyramid``'s arguments (TIFF-only ones such as ``quality`` are
    ignored) and returns the level shapes written.
    """
    import numcodecs
    import zarr

    path, dtype = Path(path), np.dtype(dtype)
    shapes = level_shapes(height, width, min_level_size)
    codec = None
    if compression not in (None, "none"):
        codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    cz = samples if samples <= 4 else 1  # RGB(A) in one chunk: one request per tile for viewers
    with atomic_output(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        levels: list[_Level] = []
        for k, (h, w) in enumerate(shapes):
            arr = group.create_array(str(k), shape=(samples, h, w), chunks=(cz, tile, tile), dtype=dtype,
                                     compressors=codec, fill_value=0,
                                     chunk_key_encoding={"name": "v2", "separator": "/"})
            levels.append(_Level(arr, tile, None))
        for a, b in zip(levels, levels[1:]):
            a.nxt = b
        for band in _rechunk(strips, tile, height, width, samples):
            levels[0].add(band)
        levels[0].finish()
        group.attrs.update(ngff_attrs(shapes, samples, dtype, mpp, channel_names, path.stem, metadata))
    return shapes


def ngff_attrs(shapes: list[tuple[int, int]], samples: int, dtype: np.dtype, mpp: float | None,
               channel_names: list[str] | None, name: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The group attributes: NGFF 0.4 ``multiscales``, ``omero`` channel display, vstain provenance."""
    unit = {"unit": "micrometer"} if mpp else {}
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit}]
    base = float(mpp) if mpp else 1.0
    datasets = []
    for k in range(len(shapes)):
        fy = fx = float(2**k)  # a level-k pixel is the mean of 2^k x 2^k level-0 pixels (edges dropped)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, base * fy, base * fx]}]
        if k:  # a 2x2-mean pixel's centre lies half a (level-0 block - 1 px) inwards
            transforms.append({"type": "translation",
                               "translation": [0.0, base * (fy - 1) / 2, base * (fx - 1) / 2]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    rgb = samples == 3 and dtype == np.uint8
    names = channel_names or (["R", "G", "B"] if rgb else [f"C{i}" for i in range(samples)])
    colors = ["FF0000", "00FF00", "0000FF"] if rgb else ["FFFFFF"] * samples
    top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    omero = {"name": name, "version": NGFF_VERSION, "rdefs": {"model": "color" if rgb else "greyscale"},
             "channels": [{"label": n, "color": c, "active": True, "coefficient": 1.0, "family": "linear",
                           "inverted": False, "window": {"start": 0.0, "end": top, "min": 0.0, "max": top}}
                          for n, c in zip(names, colors)]}
    return {"multiscales": [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
                             "type": "2x2 mean"}],
            "omero": omero, "vstain": {**(metadata or {}), **({"mpp": mpp} if mpp else {})}}


def read_ngff_provenance(path: str | Path) -> dict[str, Any]:
    """The vstain provenance stored by ``write_ngff`` (empty dict if none)."""
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs).get("vstain", {})
