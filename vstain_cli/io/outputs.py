"""Where a command's output goes: the one home of output checks and publishing.

A ``SlideOutput`` is checked before any heavy work (``check``: not an input, not
holding an input, no overwrite without ``--force``, never replacing something of
another kind, a writable parent) and written under a temporary name that is
renamed onto the final path when complete (``publish``; the temp-name and rename
rules are ``provenance.tmp_name`` / ``provenance.atomic_output``). Two kinds:

- ``FileOutput``: one image, a pyramidal TIFF (``.tif``/``.tiff``) or an OME-Zarr
  image (``.zarr``, a folder that viewers open as one image); any other suffix is
  refused in one line;
- ``FolderOutput``: a folder of files (``uncertainty``'s maps, a tiled slide, a
  bundled run), recognised by a marker file when ``--force`` replaces it.

Both image writers (``io/tiff.write_pyramid``, ``io/ngff.write_ngff``) take the
same arguments, so a pipeline only picks one (``FileOutput.write``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.io.ngff import is_zarr, write_ngff
from vstain_cli.io.tiff import write_pyramid
from vstain_cli.provenance import atomic_output, ensure_writable_dir

OUTPUT_FORMATS = ("tiff", "zarr")
SUFFIX = {"tiff": ".tif", "zarr": ".zarr"}
FORMAT_OF_SUFFIX = {".tif": "tiff", ".tiff": "tiff", ".zarr": "zarr"}


def writer_for(fmt: str) -> Callable[..., list[tuple[int, int]]]:
    """``write_pyramid`` for "tiff", ``write_ngff`` for "zarr"."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    return write_pyramid if fmt == "tiff" else write_ngff


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """The image format an output path asks for: from ``fmt`` (--format) or its suffix.

    InputError in one line for a suffix that is neither a TIFF nor ``.zarr`` (a
    ``.png`` would otherwise get a BigTIFF under a PNG name) or that contradicts ``fmt``.
    A name without a suffix is taken as it is when ``fmt`` is given.
    """
    path = Path(path)
    by_suffix = FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if by_suffix is None and fmt is not None and not path.suffix:
        return fmt  # an explicit --format names a suffix-less output as it is (``-o stained --format zarr``)
    if by_suffix is None:
        raise InputError(f"output suffix {path.suffix or '(none)'!r} is neither a TIFF (.tif, .tiff) nor an "
                         "OME-Zarr (.zarr); name the output e.g. slide.tif or slide.zarr", path)
    if fmt is not None and fmt != by_suffix:
        raise InputError(f"--format {fmt} contradicts the output suffix {path.suffix}", path)
    return by_suffix


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


class SlideOutput:
    """An output path with its ``--force`` choice: checked once, published atomically."""

    kind = "output"

    def __init__(self, path: str | Path, force: bool = False) -> None:
        self.path, self.force = Path(path), force

    def check(self, inputs: Iterable[str | Path] = ()) -> Path:
        """Refuse an output that is an input or holds one, exists without ``--force``, or may not be replaced."""
        for src in (Path(p) for p in inputs):
            if self.path.resolve() == src.resolve():
                raise InputError("output path is the input; choose another --out", self.path)
            if self.path.is_dir() and _inside(src, self.path):
                raise InputError(f"output folder holds the input {src}; choose another --out", self.path)
        if self.path.exists():
            if not self.force:
                raise OutputExistsError("output exists; pass --force to overwrite it", self.path)
            self.check_replaceable()
        ensure_writable_dir(self.path.parent)
        return self.path

    def check_replaceable(self) -> None:
        """InputError when the existing output is not of this kind (``--force`` never deletes other things)."""

    @contextlib.contextmanager
    def publish(self) -> Iterator[Path]:
        """A temporary path to write to, renamed onto the output on success and removed on any error."""
        with atomic_output(self.path) as tmp:
            yield tmp


class FileOutput(SlideOutput):
    """One image: a pyramidal TIFF or an OME-Zarr image, chosen by ``fmt`` or the suffix."""

    kind = "image"

    def __init__(self, path: str | Path, force: bool = False, fmt: str | None = None) -> None:
        super().__init__(path, force)
        self.format = output_format(self.path, fmt)

    def check_replaceable(self) -> None:
        if self.format == "zarr" and self.path.is_dir() and not is_zarr(self.path):
            raise InputError("output exists and is a folder that is not an OME-Zarr image; refusing to replace it",
                             self.path)
        if self.format == "tiff" and self.path.is_dir():
            raise InputError("output exists and is a folder; choose another --out for a TIFF", self.path)

    @property
    def thumbnail(self) -> Path:
        """The PNG preview written next to the image."""
        return self.path.with_name(self.path.stem + ".thumbnail.png")

    def write(self, strips: Iterable[np.ndarray], height: int, width: int, samples: int, dtype: Any,
              **options: Any) -> list[tuple[int, int]]:
        """Stream strips into the image (the writer publishes atomically); the level shapes written."""
        return writer_for(self.format)(self.path, strips, height, width, samples, dtype, **options)


class FolderOutput(SlideOutput):
    """A folder of files. ``marker``: the file that marks an earlier output of the same kind
    (``--force`` replaces only such a folder, or an empty one)."""

    kind = "folder"

    def __init__(self, path: str | Path, force: bool = False, marker: str | None = None) -> None:
        super().__init__(path, force)
        self.marker = marker

    def check_replaceable(self) -> None:
        if not self.path.is_dir():
            raise InputError("output exists and is not a folder (this command writes a folder)", self.path)
        if self.marker and any(self.path.iterdir()) and not (self.path / self.marker).exists():
            raise InputError(f"output folder holds no {self.marker}, so it is not an output of this command; "
                             "refusing to replace it", self.path)

    @contextlib.contextmanager
    def publish(self) -> Iterator[Path]:
        """A fresh temporary folder, renamed onto the output (replacing an older one) when complete."""
        with atomic_output(self.path) as tmp:
            tmp.mkdir(parents=True)
            yield tmp
