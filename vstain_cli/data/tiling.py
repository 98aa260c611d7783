"""``vstain tile``: co-registered AF + H&E slide pairs -> a paired patch dataset.

Per slide: a tissue mask on a low-resolution H&E view, the patch grid over it,
then patches read row band by row band (threads share one reader; decoders
release the GIL) into memory-mapped ``.npy`` arrays in a temporary folder that
is renamed when the slide is complete. A rerun skips finished slides, so an
interrupted run resumes and ends with the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vstain_cli.data import store as ds
from vstain_cli.data.manifest import SlidePair, assign_splits, read_pairs
from vstain_cli.data.register_pairs import load_registration
from vstain_cli.data.registration import alignment_check, registered_thumbnail
from vstain_cli.data.warp import Transform, read_registered
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.io.grid import Patch, patch_grid, tissue_mask_he
from vstain_cli.io.slides import SlideReader, TiffSlide, open_af, open_he
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import (
    atomic_output,
    ensure_writable_dir,
    fingerprint,
    record,
    remove_path,
    replace_path,
    stale_tmp_names,
    tmp_name,
    write_json,
)

NORM_PERCENTILES = (0.5, 99.5)
THUMB_PX_PER_PATCH = 8  # the tissue mask resolves a patch with 8 x 8 thumbnail pixels


@dataclass
class TileOptions:
    """Settings of ``vstain tile``; they identify a dataset (a rerun must match)."""

    size: int = 128
    stride: int = 128
    min_tissue: float = 0.5
    split_seed: int = 0
    max_shift: float = 3.0  # µm: patches whose measured AF/H&E misalignment is larger are dropped

    def check(self) -> None:
        if self.max_shift <= 0:
            raise InputError("--max-shift must be positive (µm)")
        if self.size < 16 or self.size % 8:
            raise InputError(f"--size {self.size} must be a multiple of 8 and at least 16")
        if self.stride < 1:
            raise InputError("--stride must be positive")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InputError("--min-tissue must be between 0 and 1")


@dataclass
class SlideResult:
    """What tiling one slide produced."""

    slide_id: str
    label: int
    split: str
    patches: int
    tissue_fraction: list[float] = field(repr=False)
    xy: list[list[int]] = field(repr=False)
    skipped: str | None = None
    resumed: bool = False
    sources: dict[str, Any] = field(default_factory=dict, repr=False)  # af/he fingerprints
    alignment: dict[str, Any] = field(default_factory=dict, repr=False)  # residual misalignment check


@dataclass
class TileSummary:
    """Result of a ``tile`` run."""

    out: Path
    slides: list[SlideResult]
    channels: int

    def counts(self) -> dict[str, dict[int, int]]:
        """split -> label -> patches."""
        table: dict[str, dict[int, int]] = {s: {} for s in ds.SPLITS}
        for r in self.slides:
            table[r.split][r.label] = table[r.split].get(r.label, 0) + r.patches
        return table


@dataclass
class _OpenPair:
    pair: SlidePair
    af: TiffSlide
    he: SlideReader
    transform: Transform | None = None  # AF -> H&E registration, when pairs.csv names one

    def close(self) -> None:
        self.af.close()
        self.he.close()


def _open_and_check(pairs: list[SlidePair]) -> tuple[list[_OpenPair], int, str]:
    """Open every pair before writing anything; check sizes, channels and dtypes agree."""
    opened: list[_OpenPair] = []
    channels = dtype = None
    first = None
    try:
        for p in pairs:
            af = open_af(p.af)
            try:
                he = open_he(p.he)
            except BaseException:
                af.close()
                raise
            opened.append(_OpenPair(p, af, he))  # closed below if anything of this pair is wrong
            if p.registration:
                opened[-1].transform = load_registration(p.registration, p)
            if opened[-1].transform is None and (af.width, af.height) != (he.width, he.height):
                raise InputError(
                    f"AF is {af.width}x{af.height} px but its H&E {p.he.name} is {he.width}x{he.height} px "
                    "(pairs must be co-registered on the same pixel grid; vstain register aligns them)",
                    p.af,
                )
            if channels is None:
                channels, dtype, first = af.channels, str(af.dtype), p
            elif af.channels != channels:
                raise InputError(
                    f"AF has {af.channels} channels but {first.af.name} has {channels} (all slides must match)", p.af
                )
            elif str(af.dtype) != dtype:
                raise InputError(f"AF dtype {af.dtype} differs from {first.af.name} ({dtype})", p.af)
    except BaseException:
        for o in opened:
            o.close()
        raise
    return opened, int(channels), str(dtype)


def _settings(options: TileOptions, pairs: list[SlidePair], channels: int, dtype: str) -> dict[str, Any]:
    return {**asdict(options), "channels": channels, "af_dtype": dtype,
            "pairs": {p.slide_id: {"label": p.label, "split": p.split,  # a registration changes every H&E patch
                                   **({"registration": fingerprint(p.registration)["sha256_head_tail"]}
                                      if p.registration else {})} for p in pairs}}


def _why_empty(op: _OpenPair, size: int) -> str:
    """Why a slide gave no patches: too small for --size, or no tissue."""
    if op.af.width < size or op.af.height < size:
        return f"the slide ({op.af.width}x{op.af.height} px) is smaller than --size {size}"
    return "no tissue found"


def check_sizes(opened: list[_OpenPair], size: int) -> None:
    """InputError when --size is larger than every slide (nothing could be tiled)."""
    fits = [op for op in opened if min(op.af.width, op.af.height) >= size]
    if opened and not fits:
        big = max(opened, key=lambda op: min(op.af.width, op.af.height))
        raise InputError(f"--size {size} is larger than every slide (the largest, {big.pair.slide_id}, is "
                         f"{big.af.width}x{big.af.height} px); use --size <= "
                         f"{min(big.af.width, big.af.height) // 8 * 8}", big.pair.af)


def missing_labels(results: list[SlideResult]) -> dict[str, list[int]]:
    """Per split with patches: labels that another split has but it lacks."""
    by_split: dict[str, set[int]] = {}
    for r in results:
        if r.patches:
            by_split.setdefault(r.split, set()).add(r.label)
    every = set().union(*by_split.values()) if by_split else set()
    return {sp: sorted(every - have) for sp, have in sorted(by_split.items()) if every - have}


def _prepare_out(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Create/clean the output folder; refuse a dataset made with other settings."""
    ensure_writable_dir(out)
    slides_dir = out / "slides"
    state = out / "tile-settings.json"
    if force:
        for name in ("dataset.json", "index.csv", "tile-settings.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(slides_dir, ignore_errors=True)
    elif state.exists():
        try:
            old = json.loads(state.read_text())
        except ValueError:
            old = None
        if old != settings:
            raise OutputExistsError(
                "holds a dataset made with other settings or slides; pass --force to redo it", out
            )
    elif (out / "dataset.json").exists() or slides_dir.exists():
        raise OutputExistsError("holds a dataset not made by this vstain version; pass --force to redo it", out)
    slides_dir.mkdir(exist_ok=True)
    for stale in stale_tmp_names(slides_dir):  # left by a killed run
        remove_path(stale)
    write_json(state, settings)


class _NpyWriter:
    """Appends rows to a ``.npy`` file with plain sequential writes.

    Sequential ``write`` calls run at page-cache speed; filling a fresh
    memory map instead costs a page fault per 4 KiB and halves tiling speed.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        self.f = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(self.f, header)
        self.rows_left = shape[0]

    def append(self, block: np.ndarray) -> None:
        self.rows_left -= block.shape[0]
        self.f.write(memoryview(np.ascontiguousarray(block)).cast("B"))

    def close(self) -> None:
        self.f.close()

    @property
    def complete(self) -> bool:
        return self.rows_left == 0


def _read_rows(
    op: _OpenPair, patches: list[Patch], size: int, af_out: _NpyWriter, he_out: _NpyWriter,
    workers: int, progress: Progress,
) -> None:
    """Read patches band by band (threads over bands), append them in grid order."""
    rows: dict[int, list[int]] = {}
    for i, p in enumerate(patches):
        rows.setdefault(p.y, []).append(i)
    channels = op.af.channels

    def read_row(y: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rows[y]
        x0 = patches[idx[0]].x
        x1 = patches[idx[-1]].x + size
        af = op.af.read_region(x0, y, x1 - x0, size)  # (size, span, C)
        try:
            he = read_registered(op.he, op.transform, x0, y, x1 - x0, size)
        except Exception as e:  # OpenSlide raises on corrupt tiles
            if isinstance(e, InputError):
                raise
            raise InputError(f"cannot read pixels ({str(e)[:120]})", op.pair.he) from None
        af_patches = np.empty((len(idx), channels, size, size), af.dtype)
        he_patches = np.empty((len(idx), 3, size, size), np.uint8)
        for j, i in enumerate(idx):  # channels-last band -> channels-first patches
            dx = patches[i].x - x0
            af_patches[j] = af[:, dx : dx + size].transpose(2, 0, 1)
            he_patches[j] = he[:, dx : dx + size, :3].transpose(2, 0, 1)
        return af_patches, he_patches

    def consume(results) -> None:
        for af_patches, he_patches in results:
            af_out.append(af_patches)
            he_out.append(he_patches)
            progress.advance("patches", len(af_patches))

    if workers <= 1:
        consume(read_row(y) for y in sorted(rows))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        consume(pool.map(read_row, sorted(rows)))


def _tile_slide(
    op: _OpenPair, split: str, options: TileOptions, out: Path, workers: int, progress: Progress
) -> SlideResult:
    p = op.pair
    final = out / "slides" / p.slide_id
    meta_file = final / "slide.json"
    if meta_file.exists():
        try:
            done = json.loads(meta_file.read_text())
            if done.get("complete"):
                return SlideResult(p.slide_id, p.label, split, int(done["patches"]), done["tissue_fraction"],
                                   done["xy"], resumed=True, sources={"af": done["af"], "he": done["he"]},
                                   alignment=done.get("alignment", {}))
        except (ValueError, KeyError):
            pass
        shutil.rmtree(final, ignore_errors=True)

    size = options.size
    thumb_max = max(64, int(np.ceil(max(op.he.width, op.he.height) * THUMB_PX_PER_PATCH / size)))
    if op.transform is None:
        thumb, downsample = op.he.thumbnail(thumb_max)
    else:  # the H&E seen through the registration, on the AF grid
        thumb, downsample = registered_thumbnail(op.af, op.he, op.transform, thumb_max)
    mask = tissue_mask_he(thumb)
    patches = patch_grid(mask, downsample, op.af.width, op.af.height, size, options.stride, options.min_tissue)
    keep, alignment, warning = alignment_check(op.af, op.he, op.transform, [(q.x, q.y) for q in patches], size,
                                               op.af.mpp or op.he.mpp, options.max_shift)
    if warning:
        progress.warn(f"{p.he}: {warning}")
    patches = [q for q, k in zip(patches, keep) if k]
    tmp = tmp_name(final)  # the one temp-name rule; published with replace_path
    remove_path(tmp)
    tmp.mkdir(parents=True)
    n = len(patches)
    try:
        af_arr = _NpyWriter(tmp / "af.npy", (n, op.af.channels, size, size), op.af.dtype)
        he_arr = _NpyWriter(tmp / "he.npy", (n, 3, size, size), np.dtype(np.uint8))
        progress.start("patches", f"{p.slide_id}: {n} patches", n)
        try:
            if n:
                _read_rows(op, patches, size, af_arr, he_arr, workers, progress)
        finally:
            af_arr.close()
            he_arr.close()
        if not (af_arr.complete and he_arr.complete):
            raise RuntimeError(f"{p.slide_id}: patch arrays incomplete")
        progress.finish("patches")
        result = SlideResult(
            p.slide_id, p.label, split, n, [round(q.tissue_fraction, 4) for q in patches],
            [[q.x, q.y] for q in patches], skipped=None if n else _why_empty(op, size),
            sources={"af": fingerprint(p.af), "he": fingerprint(p.he)}, alignment=alignment,
        )
        info = {"complete": True, "slide_id": p.slide_id, "label": p.label, "split": split, "patches": n,
                "mask_downsample": downsample, "tissue_area_fraction": float(mask.mean()),
                "tissue_fraction": result.tissue_fraction, "xy": result.xy, "alignment": alignment,
                **result.sources, "mpp": op.af.mpp or op.he.mpp}
        (tmp / "slide.json").write_text(json.dumps(info))
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    return result


def af_normalization(out: Path, results: list[SlideResult], channels: int, seed: int = 0) -> dict[str, Any]:
    """Per-channel percentiles of AF over the train split only (no leakage)."""
    samples = []
    for r in results:
        if r.split != "train" or not r.patches:
            continue
        af = np.load(out / "slides" / r.slide_id / "af.npy", mmap_mode="r")
        take = np.linspace(0, r.patches - 1, min(r.patches, 64)).astype(int)
        samples.append(np.asarray(af[take][:, :, ::4, ::4]).transpose(1, 0, 2, 3).reshape(channels, -1))
    if not samples:
        raise InputError("no train patches to compute AF normalisation from (check splits and --min-tissue)", out)
    pix = np.concatenate(samples, axis=1).astype(np.float32)
    low, high = np.percentile(pix, NORM_PERCENTILES, axis=1)
    high = np.maximum(high, low + 1e-3)
    return {"method": "percentile", "percentiles": list(NORM_PERCENTILES),
            "low": [float(v) for v in low], "high": [float(v) for v in high],
            "from_split": "train", "pixels": int(pix.shape[1])}


def _write_index(out: Path, results: list[SlideResult]) -> None:
    with atomic_output(out / "index.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(ds.INDEX_COLUMNS)
            for r in sorted(results, key=lambda r: r.slide_id):
                for i, ((x, y), frac) in enumerate(zip(r.xy, r.tissue_fraction)):
                    w.writerow([r.split, r.slide_id, i, x, y, r.label, f"{frac:.4f}"])


def tile(
    pairs_csv: str | Path,
    out: str | Path,
    options: TileOptions | None = None,
    *,
    workers: int = 1,
    force: bool = False,
    progress: Progress | None = None,
) -> TileSummary:
    """Tile every slide pair of ``pairs_csv`` into a dataset folder ``out`` (resumable)."""
    options = options or TileOptions()
    options.check()
    progress = progress or NullProgress()
    out = Path(out)
    pairs = read_pairs(pairs_csv)
    splits = assign_splits(pairs, options.split_seed)
    opened, channels, dtype = _open_and_check(pairs)
    created = not out.exists()
    try:
        check_sizes(opened, options.size)
        settings = _settings(options, pairs, channels, dtype)
        _prepare_out(out, settings, force)
        progress.start("slides", "slides", len(opened))
        results = []
        for op in opened:
            r = _tile_slide(op, splits[op.pair.slide_id], options, out, workers, progress)
            if r.skipped:
                progress.warn(f"{op.pair.he}: {r.skipped}; slide skipped")
            results.append(r)
            progress.advance("slides")
        progress.finish("slides")
        if all(r.resumed for r in results) and (out / "dataset.json").exists() and (out / "index.csv").exists():
            return TileSummary(out, results, channels)  # complete already: keep its record (and fingerprint)
        norm = af_normalization(out, results, channels)
        meta = {
            "format": ds.FORMAT,
            "format_version": ds.FORMAT_VERSION,
            "channels": channels,
            "af_dtype": dtype,
            "tile_size": options.size,
            "stride": options.stride,
            "min_tissue": options.min_tissue,
            "split_seed": options.split_seed,
            "split_fractions": [0.5, 0.2, 0.3],
            "af_normalization": norm,
            "slides": {
                r.slide_id: {"label": r.label, "split": r.split, "patches": r.patches,
                             **r.sources, "alignment": r.alignment,
                             "mpp": op.af.mpp or op.he.mpp, **({"skipped": r.skipped} if r.skipped else {})}
                for r, op in zip(results, opened)
            },
            "mpp": next((op.af.mpp or op.he.mpp for op in opened if op.af.mpp or op.he.mpp), None),
            **record({"tile": asdict(options), "pairs": str(Path(pairs_csv).resolve())}),
        }
        _write_index(out, results)
        write_json(out / "dataset.json", meta)
        for split, labels in missing_labels(results).items():
            progress.warn(f"the {split} split has no patches with label(s) {labels} that other splits have "
                          f"(StainNet/FSD need every label in train and val); try another --split-seed or add slides")
    except Exception:
        if created:  # nothing of a failed first run is left behind (Ctrl-C keeps it: tile resumes)
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        for op in opened:
            op.close()
    return TileSummary(out, results, channels)
