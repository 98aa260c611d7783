"""The on-disk patch dataset written by ``vstain tile`` (docs/data.md).

Layout of ``dataset/``::

    dataset.json                 channels, dtype, tile size, AF normalisation
                                 (train split only), splits, fingerprints, version
    index.csv                    split,slide_id,row,x,y,label,tissue_fraction
    slides/<slide_id>/af.npy     (N, C, S, S) AF patches, source dtype
    slides/<slide_id>/he.npy     (N, 3, S, S) uint8 H&E patches

Row ``row`` of a slide in ``index.csv`` is row ``row`` of its arrays; ``x, y``
are the patch's top-left corner in level-0 pixels of the slide.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vstain_cli.errors import InputError
from vstain_cli.io.images import he_to_unit, unit_to_he  # noqa: F401 - the dataset's pixel convention
from vstain_cli.provenance import read_format_json

FORMAT = "vstain-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("split", "slide_id", "row", "x", "y", "label", "tissue_fraction")


@dataclass
class SlideEntry:
    """One slide's patches in the dataset."""

    slide_id: str
    label: int
    split: str
    n: int


@dataclass
class DatasetInfo:
    """A tiled dataset opened for reading (arrays are memory-mapped lazily)."""

    root: Path
    channels: int
    af_dtype: str
    tile_size: int
    af_low: np.ndarray
    af_high: np.ndarray
    slides: dict[str, SlideEntry]
    meta: dict[str, Any] = field(repr=False)

    def slide_ids(self, split: str | None = None) -> list[str]:
        """Slides of one split (or all), in a stable order."""
        return sorted(s for s, e in self.slides.items() if split is None or e.split == split)

    def patch_keys(self, split: str) -> list[tuple[str, int]]:
        """(slide_id, row) for every patch of ``split``, in a stable order."""
        return [(s, r) for s in self.slide_ids(split) for r in range(self.slides[s].n)]

    def arrays(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (af, he) arrays of one slide."""
        folder = self.root / "slides" / slide_id
        try:
            af = np.load(folder / "af.npy", mmap_mode="r")
            he = np.load(folder / "he.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read patch arrays ({e})", folder) from None
        n = self.slides[slide_id].n
        c, s = self.channels, self.tile_size
        if af.shape != (n, c, s, s) or he.shape != (n, 3, s, s):
            raise InputError(
                f"patch arrays have shapes {af.shape} and {he.shape}, expected "
                f"{(n, c, s, s)} and {(n, 3, s, s)}",
                folder,
            )
        return af, he

    def labels(self, split: str) -> np.ndarray:
        """Slide label of every patch of ``split`` (same order as ``patch_keys``)."""
        return np.array([self.slides[s].label for s, _ in self.patch_keys(split)], dtype=np.int64)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this dataset in a run's config."""
        return {
            "root": str(self.root),
            "channels": self.channels,
            "tile_size": self.tile_size,
            "patches": {sp: len(self.patch_keys(sp)) for sp in SPLITS},
            "created": self.meta.get("created"),
            "mpp": self.meta.get("mpp"),  # the training scale (µm/px); stain/uncertainty resample to it
        }


def normalize_af(af: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map raw AF (..., C, H, W) to float32 in [-1, 1] with per-channel percentiles."""
    lo = np.asarray(low, np.float32).reshape(-1, 1, 1)
    hi = np.asarray(high, np.float32).reshape(-1, 1, 1)
    x = (af.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-6)
    return np.clip(x, 0.0, 1.0) * 2.0 - 1.0


def open_dataset(root: str | Path) -> DatasetInfo:
    """Open a dataset folder written by ``vstain tile``; errors name the bad file."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not root.is_dir():
        raise InputError("dataset folder not found (make one with `vstain tile`)", root)
    meta = read_format_json(
        meta_path, FORMAT, missing=("not a vstain dataset (no dataset.json; make one with `vstain tile`)", root),
        corrupt="corrupt dataset.json", wrong="not a vstain dataset.json (format field missing)")
    try:
        channels = int(meta["channels"])
        slides = {
            sid: SlideEntry(sid, int(e["label"]), str(e["split"]), int(e["patches"]))
            for sid, e in meta["slides"].items()
        }
        norm = meta["af_normalization"]
        low = np.asarray(norm["low"], np.float32)
        high = np.asarray(norm["high"], np.float32)
        info = DatasetInfo(
            root=root,
            channels=channels,
            af_dtype=str(meta["af_dtype"]),
            tile_size=int(meta["tile_size"]),
            af_low=low,
            af_high=high,
            slides=slides,
            meta=meta,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"corrupt dataset.json (bad or missing field {e})", meta_path) from None
    if low.shape != (channels,) or high.shape != (channels,):
        raise InputError("corrupt dataset.json (normalisation does not match channels)", meta_path)
    return info


def read_index(root: str | Path) -> list[dict[str, Any]]:
    """Rows of ``index.csv`` with typed fields."""
    path = Path(root) / "index.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read index ({e.strerror or e})", path) from None
    out = []
    for r in rows:
        out.append(
            {
                "split": r["split"],
                "slide_id": r["slide_id"],
                "row": int(r["row"]),
                "x": int(r["x"]),
                "y": int(r["y"]),
                "label": int(r["label"]),
                "tissue_fraction": float(r["tissue_fraction"]),
            }
        )
    return out
