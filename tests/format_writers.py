"""Small multi-channel AF files written by each format's own writer (for the reader tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

MPP = 0.5


def write_ome_tiff(path: Path, hwc: np.ndarray, mpp: float = MPP, levels: int = 2) -> Path:
    """tifffile's OME-TIFF: CYX planes, tiled, SubIFD pyramid, PhysicalSizeX."""
    cyx = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tw:
        tw.write(cyx, tile=(64, 64), subifds=levels - 1, compression="zlib",
                 metadata={"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
        for k in range(1, levels):
            tw.write(cyx[:, :: 2**k, :: 2**k], tile=(64, 64), subfiletype=1, compression="zlib")
    return path


def write_plain_tiff(path: Path, hwc: np.ndarray, mpp: float = MPP, levels: int = 2) -> Path:
    """tifffile's plain TIFF (no OME or ImageJ metadata): one page of C contiguous samples, tiled,
    a SubIFD pyramid, µm/px only in the resolution tags."""
    common = dict(photometric="minisblack", planarconfig="contig", tile=(64, 64), compression="zlib", metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(hwc, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", subifds=levels - 1, **common)
        for k in range(1, levels):
            tw.write(np.ascontiguousarray(hwc[:: 2**k, :: 2**k]), subfiletype=1, **common)
    return path


def _qpi_description(name: str, kind: str, mpp: float) -> str:
    return ('<?xml version="1.0" encoding="utf-8"?><PerkinElmer-QPI-ImageDescription>'
            f"<DescriptionVersion>2</DescriptionVersion><AcquisitionSoftware>vstain tests</AcquisitionSoftware>"
            f"<ImageType>{kind}</ImageType><Identifier>{name}</Identifier><Name>{name}</Name>"
            f"<ScanProfile><root><ScanResolution><PixelSizeMicrons>{mpp}</PixelSizeMicrons></ScanResolution>"
            "</root></ScanProfile></PerkinElmer-QPI-ImageDescription>")


def write_qptiff(path: Path, hwc: np.ndarray, mpp: float = MPP, levels: int = 2) -> Path:
    """Akoya/PerkinElmer QPTIFF layout with tifffile: one tiled page per channel, an RGB
    thumbnail page, then each reduced resolution as one page per channel (Software
    'PerkinElmer-QPI', XML ImageDescription with PixelSizeMicrons)."""
    h, w, c = hwc.shape
    res = (1e4 / mpp, 1e4 / mpp)
    common = dict(software="PerkinElmer-QPI", photometric="minisblack", compression="zlib", metadata=None,
                  resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i in range(c):
            tw.write(np.ascontiguousarray(hwc[..., i]), tile=(64, 64), resolution=res,
                     description=_qpi_description(f"AF{i}", "FullResolution", mpp), **common)
        thumb = np.repeat((hwc[::8, ::8, :1] >> 8).astype(np.uint8), 3, axis=2)
        tw.write(thumb, software="PerkinElmer-QPI", photometric="rgb", metadata=None,
                 description=_qpi_description("Thumbnail", "Thumbnail", mpp * 8))
        for k in range(1, levels):
            f = 2**k
            for i in range(c):
                tw.write(np.ascontiguousarray(hwc[::f, ::f, i][: h // f, : w // f]), tile=(64, 64), subfiletype=1,
                         resolution=(res[0] / f, res[1] / f),
                         description=_qpi_description(f"AF{i}", "ReducedResolution", mpp * f), **common)
    return path


def write_czi(path: Path, hwc: np.ndarray, mpp: float = MPP, origin: tuple[int, int] = (1000, 2000),
              tile: int = 128) -> Path:
    """pylibCZIrw (libCZI): one Gray16 plane per channel, in tiles, at a stage origin, metres per pixel."""
    from pylibCZIrw import czi as pyczi

    h, w, c = hwc.shape
    with pyczi.create_czi(str(path), exist_ok=True) as out:
        for i in range(c):
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    out.write(np.ascontiguousarray(hwc[y : y + tile, x : x + tile, i : i + 1]), plane={"C": i},
                              location=(origin[0] + x, origin[1] + y))
        out.write_metadata(scale_x=mpp * 1e-6, scale_y=mpp * 1e-6, channel_names={i: f"AF{i}" for i in range(c)})
    return path


def write_ome_zarr(path: Path, hwc: np.ndarray, mpp: float = MPP, version: str = "0.4", levels: int = 2) -> Path:
    """ome-zarr-py's writer: a ``c, y, x`` multiscale with µm scales (NGFF 0.4 on Zarr v2 or 0.5 on v3)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    store = parse_url(str(path), mode="w", fmt=fmt).store
    root = zarr.group(store=store, zarr_format=fmt.zarr_format)
    write_image(image=np.ascontiguousarray(hwc.transpose(2, 0, 1)), group=root, axes="cyx",
                scale_factors=tuple(2**k for k in range(1, levels)), scale={"y": mpp, "x": mpp},
                axes_units={"y": "micrometer", "x": "micrometer"}, storage_options={"chunks": (1, 64, 64)}, fmt=fmt)
    return path


WRITERS = {
    "ome-tiff": (write_ome_tiff, "af.ome.tif"),
    "tiff": (write_plain_tiff, "af.tif"),
    "qptiff": (write_qptiff, "af.qptiff"),
    "czi": (write_czi, "af.czi"),
    "ome-zarr-0.4": (lambda p, a, **k: write_ome_zarr(p, a, version="0.4", **k), "af.zarr"),
    "ome-zarr-0.5": (lambda p, a, **k: write_ome_zarr(p, a, version="0.5", **k), "af.ome.zarr"),
}


def write(fmt: str, folder: Path, hwc: np.ndarray, name: str | None = None, **kw) -> Path:
    """Write ``hwc`` in ``fmt`` into ``folder``; returns the path."""
    fn, default = WRITERS[fmt]
    return fn(folder / (name or default), hwc, **kw)


# ----------------------------------------------------------------------------- files vstain must refuse or route


def write_ome_stack(path: Path, array: np.ndarray, axes: str) -> Path:
    """tifffile's OME writer with any axes (``TZCYX``, ``CZYX``, ...): DimensionOrder and SizeT/Z/C
    in the OME-XML follow ``axes``, one page per plane."""
    tifffile.imwrite(path, array, ome=True, photometric="minisblack", metadata={"axes": axes})
    return path


def _mcu_starts(jpeg: bytes) -> list[int]:
    """Offsets of the entropy-coded segments (after SOS, then after each RSTn marker) in a baseline JPEG."""
    sos = jpeg.index(b"\xff\xda")
    starts = [sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")]
    i = starts[0]
    while (i := jpeg.find(b"\xff", i)) != -1 and i + 1 < len(jpeg):
        if 0xD0 <= jpeg[i + 1] <= 0xD7:
            starts.append(i + 2)
        i += 2
    return starts


def write_ndpi_like(path: Path, rgb: np.ndarray, mpp: float = MPP, levels: int = 3) -> Path:
    """A Hamamatsu NDPI-like TIFF: per level one JPEG strip (Pillow, restart markers every 4 MCUs),
    Make 'Hamamatsu', NDPI tags 65420 (format flag), 65421 (source lens), 65424 (z offset) and
    65426 (McuStarts). OpenSlide opens it as vendor 'hamamatsu'; tifffile sees ``is_ndpi`` and
    splits the strip into McuStarts tiles that need the NDPI JPEG header to decode."""
    import io

    from PIL import Image

    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            a = np.ascontiguousarray(rgb[:: 2**k, :: 2**k])
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=95, subsampling=0, restart_marker_blocks=4)
            data = buf.getvalue()
            starts = _mcu_starts(data)
            tags = [(271, 2, 0, "Hamamatsu", True), (65420, 4, 1, 1, True), (65421, 11, 1, 20.0 / 2**k, True),
                    (65424, 9, 1, 0, True), (65426, 4, len(starts), starts, True)]
            tw.write(iter([data]), shape=a.shape, dtype=np.uint8, photometric="rgb", compression="jpeg",
                     rowsperstrip=a.shape[0], resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER",
                     extratags=tags, metadata=None)
    return path
