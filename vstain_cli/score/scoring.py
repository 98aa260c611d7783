"""Scoring primitives of ``vstain score``: load image sets, compute FSD/FID/L1/L2/PSNR/SSIM.

Image sets are uint8 RGB arrays (N, 3, H, W) with one name per tile; fakes pair
with the real set by name. Feature extractors are callables uint8 batch ->
features (N, D) (StainNet's penultimate layer for FSD, InceptionV3 pool3 for FID).
Definitions: docs/metrics.md. No typer/rich here; progress through ``Progress``.
The orchestration (``vstain score`` end to end) is ``vstain_cli.score.pipeline``; the
HTML report is ``vstain_cli.score.report``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vstain_cli import seeding
from vstain_cli.errors import InputError
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.runtime import resolve_device
from vstain_cli.score import metrics

# Display rules and the HTML writer live in vstain_cli.score.report; re-exported for callers.
from vstain_cli.score.report import DIGITS, HIGHER_IS_BETTER, METRIC_ORDER, format_interval, json_ready, write_report  # noqa: F401

#: The file types pytorch-fid reads (IMAGE_EXTENSIONS of pytorch_fid/fid_score.py).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".webp")

FeatureFn = Callable[[np.ndarray], Any]


@dataclass
class ImageSet:
    """A set of uint8 RGB tiles (N, 3, H, W) with a name per tile."""

    images: np.ndarray
    names: list[str]
    source: str
    #: For a dataset split: row indices -> raw AF (k, C, H, W) in the source dtype.
    af: Callable[[list[int]], np.ndarray] | None = None
    #: The dataset's AF normalisation (per-channel low/high), with ``af``.
    af_range: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def af_norm(self, rows: list[int]) -> np.ndarray:
        """AF of ``rows`` normalised to [-1, 1] with the dataset's statistics."""
        from vstain_cli.data.store import normalize_af

        if self.af is None or self.af_range is None:
            raise InputError("this image set has no AF (give a dataset folder)", self.source)
        return normalize_af(self.af(rows), *self.af_range)

    def take(self, idx: np.ndarray | list[int]) -> "ImageSet":
        """The tiles at ``idx`` (in that order)."""
        idx = [int(i) for i in idx]
        af = None
        if self.af is not None:
            base = self.af
            af = lambda rows: base([idx[r] for r in rows])  # noqa: E731
        images = np.ascontiguousarray(self.images[idx])
        return ImageSet(images, [self.names[i] for i in idx], self.source, af, self.af_range)


# ---------------------------------------------------------------- loading


def _as_nchw_uint8(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype != np.uint8:
        raise InputError(f"images must be uint8 RGB (0-255), got dtype {a.dtype}", path)
    if a.ndim == 4 and a.shape[1] == 3:
        return a
    if a.ndim == 4 and a.shape[3] == 3:
        return a.transpose(0, 3, 1, 2)
    raise InputError(f"expected an array of shape (N, 3, H, W) or (N, H, W, 3), got {a.shape}", path)


#: PIL modes whose values can exceed 255; PIL's RGB conversion clips them at 255.
_WIDE_MODES = ("I", "F")


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """One tile -> ((3, H, W) uint8 RGB, clipped), converted as pytorch-fid does.

    pytorch-fid reads every file with ``Image.open(path).convert("RGB")``; so does
    this (CMYK, greyscale, palette, RGBA, 16-bit), so FID agrees on the same files.
    ``clipped`` says a 16/32-bit tile had values above 255, which that conversion
    clips to 255. TIFFs Pillow cannot decode fall back to tifffile for 8-bit
    grey/RGB/RGBA; anything else is an InputError naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            wide = im.mode.startswith(_WIDE_MODES)
            clipped = wide and float(im.getextrema()[1]) > 255  # type: ignore[index]
            a = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input file
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise InputError(f"cannot read image ({type(e).__name__}: {e})", path) from None
        return _read_tiff(path, e), False
    return np.ascontiguousarray(a.transpose(2, 0, 1)), clipped


def _read_tiff(path: Path, pil_error: Exception) -> np.ndarray:
    """An 8-bit grey/RGB/RGBA TIFF that Pillow cannot decode, read with tifffile."""
    import tifffile

    try:
        a = tifffile.imread(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input file
        raise InputError(f"cannot read image ({type(e).__name__}: {e})", path) from None
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = a.transpose(1, 2, 0)
    if a.dtype == np.uint8 and a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)  # as PIL's L -> RGB
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(
            f"no RGB conversion for a {a.dtype} TIFF of shape {a.shape} "
            f"(Pillow: {type(pil_error).__name__}: {pil_error})",
            path,
        )
    return np.ascontiguousarray(a[..., :3].transpose(2, 0, 1))


def _load_folder(folder: Path, progress: Progress) -> ImageSet:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no image tiles ({', '.join(IMAGE_SUFFIXES)}) in folder", folder)
    names = [p.stem for p in files]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"two tiles share the name {dup!r} (tiles pair by file name)", folder)
    first, clipped = _read_image(files[0])
    out = np.empty((len(files), *first.shape), np.uint8)
    out[0] = first
    n_clipped = int(clipped)
    progress.start("load", f"reading {folder.name}", len(files))
    progress.advance("load")
    for i, p in enumerate(files[1:], 1):
        a, clipped = _read_image(p)
        n_clipped += clipped
        if a.shape != first.shape:
            raise InputError(
                f"tile size {a.shape[2]}x{a.shape[1]} differs from {files[0].name} "
                f"({first.shape[2]}x{first.shape[1]}); all tiles must have one size",
                p,
            )
        out[i] = a
        progress.advance("load")
    progress.finish("load")
    if n_clipped:
        progress.warn(
            f"{folder}: {n_clipped} tiles are 16/32-bit with values above 255; converted to RGB "
            "as pytorch-fid does (PIL convert('RGB')), which clips them at 255"
        )
    return ImageSet(out, names, str(folder))


def _load_dataset(root: Path, split: str) -> ImageSet:
    from vstain_cli.data import store as ds

    info = ds.open_dataset(root)
    if split not in ds.SPLITS:
        raise InputError(f"unknown split {split!r} (choose from {', '.join(ds.SPLITS)})", root)
    keys = info.patch_keys(split)
    if not keys:
        raise InputError(f"dataset has no {split!r} tiles", root)
    he = np.concatenate([np.asarray(info.arrays(s)[1]) for s in info.slide_ids(split)])
    names = [f"{s}_{r:06d}" for s, r in keys]

    def af(rows: list[int]) -> np.ndarray:
        return np.stack([info.arrays(keys[i][0])[0][keys[i][1]] for i in rows])

    return ImageSet(he, names, f"{root}:{split}", af, (info.af_low, info.af_high))


class StainNetScorer:
    """A trained StainNet run: penultimate features (FSD, PFD) and grade predictions from them.

    ``features`` is a ``FeatureFn`` (uint8 batch -> (B, D)); ``predict`` applies the
    classification head to features already computed, so a tile goes through the
    network once for FSD, PFD and grade accuracy (the head follows the features
    directly at inference: dropout is off).
    """

    def __init__(self, run_dir: str | Path, device: str = "auto") -> None:
        from vstain_cli.infer.bundled import bundled_path
        from vstain_cli.infer.run import load_run

        run_dir = bundled_path(run_dir) or Path(run_dir)
        if not run_dir.is_dir():
            raise InputError("StainNet run folder not found (train one with `vstain train --preset stainnet`)",
                             run_dir)
        self.run = load_run(run_dir, resolve_device(device))
        if self.run.kind != "stainnet" or not hasattr(self.run.model, "features"):
            raise InputError(f"this is a {self.run.kind} run, not a StainNet (give it with --model)", run_dir)
        self.path = run_dir
        self.n_classes = int(self.run.preset.stainnet.n_classes)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, H, W) -> penultimate features (B, D); tiles enter as x / 127.5 - 1."""
        import torch

        with torch.no_grad():
            x = torch.from_numpy(batch).to(self.run.device).float() / 127.5 - 1.0
            return self.run.model.features(x).float().cpu().numpy()

    def predict(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Predicted label (N,) from features (N, D): argmax of the head."""
        import torch

        head = self.run.model.head
        out = []
        with torch.no_grad():
            for s in range(0, len(features), batch_size):
                f = torch.as_tensor(np.asarray(features[s : s + batch_size], np.float32), device=self.run.device)
                out.append(head(f).argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy_record(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy and confusion matrix (rows: true label, columns: predicted) of predictions."""
    labels, pred = np.asarray(labels, np.int64), np.asarray(pred, np.int64)
    conf = np.zeros((n_classes, n_classes), np.int64)
    ok = (labels >= 0) & (labels < n_classes) & (pred >= 0) & (pred < n_classes)
    np.add.at(conf, (labels[ok], pred[ok]), 1)
    return {"accuracy": float(np.trace(conf) / max(conf.sum(), 1)), "confusion": conf.tolist(),
            "patches": int(conf.sum()), "chance": 1.0 / n_classes}


def dataset_slides(root: str | Path, names: list[str]) -> tuple[list[str], np.ndarray] | None:
    """(slide id, slide label) of each dataset tile named ``slide_row``; None when ``root`` is not a dataset.

    The slide id and label are the dataset's (index.csv / dataset.json): what the
    slide-level intervals resample and what StainNet's grade accuracy is checked on.
    """
    root = Path(root)
    if not (root / "dataset.json").is_file():
        return None
    from vstain_cli.data import store as ds

    info = ds.open_dataset(root)
    slides = [n.rsplit("_", 1)[0] for n in names]
    missing = next((s for s in slides if s not in info.slides), None)
    if missing is not None:
        raise InputError(f"tile slide {missing!r} is not a slide of this dataset", root)
    return slides, np.array([info.slides[s].label for s in slides], np.int64)


def load_images(path: str | Path, split: str = "test", progress: Progress | None = None) -> ImageSet:
    """Load tiles from a folder of image files (``IMAGE_SUFFIXES``, sorted by name; the stem is the
    tile's name), a ``.npy`` array (N, 3, H, W) or (N, H, W, 3) uint8 (names are
    row numbers), or a ``vstain tile`` dataset folder's ``split``."""
    path = Path(path)
    progress = progress or NullProgress()
    if not path.exists():
        raise InputError("image set not found (a folder of tiles, a .npy array or a dataset folder)", path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return _load_dataset(path, split)
        return _load_folder(path, progress)
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read .npy array ({e})", path) from None
        a = np.ascontiguousarray(_as_nchw_uint8(a, path))
        if len(a) == 0:
            raise InputError("array holds no tiles", path)
        return ImageSet(a, [f"{i:06d}" for i in range(len(a))], str(path))
    raise InputError("not an image set: give a folder of image tiles, a .npy array or a dataset folder", path)


def pair_with_real(real: ImageSet, fake: ImageSet, progress: Progress | None = None) -> tuple[ImageSet, bool]:
    """Order ``fake`` like ``real`` by tile name; returns (fake, paired).

    Same names -> paired by name. No common name and equal N -> paired by sorted
    order (with a warning). No common name and different N -> unpaired (FD only).
    A partial name overlap or a different tile size is an InputError.
    """
    progress = progress or NullProgress()
    if real.images.shape[2:] != fake.images.shape[2:]:
        rh, rw = real.images.shape[2:]
        fh, fw = fake.images.shape[2:]
        raise InputError(f"fake tiles are {fw}x{fh} but real tiles are {rw}x{rh}; score tiles of one size", fake.source)
    pos = {n: i for i, n in enumerate(fake.names)}
    common = [n for n in real.names if n in pos]
    if len(common) == len(real) == len(fake):
        return fake.take([pos[n] for n in real.names]), True
    if common:
        missing = next((n for n in real.names if n not in pos), None)
        extra = next((n for n in fake.names if n not in set(real.names)), None)
        what = f"no fake tile for real tile {missing!r}" if missing else f"fake tile {extra!r} has no real tile"
        raise InputError(
            f"{len(fake)} fake tiles vs {len(real)} real tiles, {len(common)} names in common: {what}",
            fake.source,
        )
    if len(real) == len(fake):
        progress.warn(f"{fake.source}: no tile names match the real set; pairing tiles by sorted order")
        return fake, True
    progress.warn(
        f"{fake.source}: {len(fake)} tiles vs {len(real)} real tiles and no names in common: "
        "unpaired, so L1/L2/PSNR/SSIM are skipped (FD only)"
    )
    return fake, False


def select_tiles(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` of ``n_total`` tiles (all if None)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n < 2:
        raise InputError(f"--n must be at least 2, got {n}")
    return np.sort(seeding.numpy_rng(seed).choice(n_total, size=n, replace=False))


# ---------------------------------------------------------------- features


def extract_features(
    images: np.ndarray, fn: FeatureFn, batch_size: int = 64, progress: Progress | None = None, label: str = ""
) -> np.ndarray:
    """Apply a feature extractor to uint8 (N, 3, H, W) in batches -> float64 (N, D)."""
    progress = progress or NullProgress()
    key = f"features:{label}"
    progress.start(key, f"features {label}", len(images))
    out = []
    for s in range(0, len(images), batch_size):
        f = fn(np.ascontiguousarray(images[s : s + batch_size]))
        if hasattr(f, "detach"):
            f = f.detach().cpu().numpy()
        f = np.asarray(f, np.float64).reshape(min(batch_size, len(images) - s), -1)
        out.append(f)
        progress.advance(key, len(f))
    progress.finish(key)
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise InputError(f"{label} features contain NaN/inf (a broken feature network?)")
    return feats


def inception_extractor(weights: str | Path, device: str = "auto") -> FeatureFn:
    """FID features: pytorch-fid's InceptionV3 pool3 (N, 2048) from a weights file."""
    import torch

    from vstain_cli.nets.inception import load_fid_inception

    model = load_fid_inception(weights, resolve_device(device))

    def fn(batch: np.ndarray) -> np.ndarray:
        return model.features_uint8(torch.from_numpy(batch)).cpu().numpy()

    return fn


def stainnet_extractor(run_dir: str | Path, device: str = "auto") -> FeatureFn:
    """FSD features: a trained StainNet run's penultimate layer ``features(x)``.

    The run is opened with ``vstain_cli.infer.run.load_run``; tiles enter as float
    (N, 3, H, W) in [-1, 1] (``dataset.he_to_unit``), as StainNet was trained.
    """
    return StainNetScorer(run_dir, device).features


def check_channels(af_channels: int, run_channels: int, source: str | Path, run_dir: str | Path) -> None:
    """InputError naming the dataset and the model when the AF channel counts differ."""
    if int(af_channels) != int(run_channels):
        raise InputError(
            f"AF has {af_channels} channels but model {run_dir} was trained on {run_channels}; "
            "score it on a dataset tiled from the same AF channels", source)


def sample_run_tiles(
    run_dir: str | Path,
    real: ImageSet,
    device: str = "auto",
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> np.ndarray:
    """Stain the AF of ``real``'s tiles with a trained run -> uint8 (N, 3, H, W).

    Every model sees the same tiles in the same batches, and batch ``b`` draws its
    noise from a generator seeded with ``derive_seed(seed, SCORE_TILES, b)``: the same noise for
    every diffusion run at a given seed. AF is normalised with the run's own
    training statistics (``Run.normalize``).
    """
    import torch

    from vstain_cli.data.store import unit_to_he
    from vstain_cli.infer.run import load_run

    progress = progress or NullProgress()
    run_dir = Path(run_dir)
    if real.af is None:
        raise InputError("--model needs AF tiles: give the dataset folder with --data (or as --real)", real.source)
    run = load_run(run_dir, resolve_device(device))
    if run.kind == "stainnet":
        raise InputError("a StainNet run classifies H&E; pass it with --stainnet, not --model", run_dir)
    check_channels(real.af([0]).shape[1] if len(real) else run.channels, run.channels, real.source, run_dir)
    out = np.empty_like(real.images)
    key = f"sample:{run_dir.name}"
    progress.start(key, f"staining with {run_dir.name}", len(real))
    for b, s in enumerate(range(0, len(real), batch_size)):
        rows = list(range(s, min(s + batch_size, len(real))))
        af = torch.from_numpy(run.normalize(real.af(rows))).to(run.device)
        g = seeding.torch_generator(seeding.derive_seed(seed, seeding.SCORE_TILES, b), run.device)
        try:
            x = run.translate(af, sampler=sampler, steps=steps, eta=eta, generator=g)
        except ValueError as e:  # e.g. steps > T
            raise InputError(f"{run_dir}: {e}") from None
        out[s : s + len(rows)] = unit_to_he(x.float().cpu().numpy())
        progress.advance(key, len(rows))
    progress.finish(key)
    return out


# ---------------------------------------------------------------- scoring


def _interval(mean: float, lo: float, hi: float) -> dict[str, float]:
    return {"value": mean, "lo": lo, "hi": hi}


#: Slides below which the slide-level intervals are warned about (the cluster bootstrap
#: under-covers with few clusters even after the sqrt(S / (S - 1)) widening).
FEW_SLIDES = 5


def interval_method(level: str, n_slides: int | None = None) -> str:
    """How the 95 % intervals were made, in words (score.json ``settings`` and the report)."""
    if level == "slides":
        return (f"slide-level cluster bootstrap over {n_slides} slides: slides drawn with replacement, every tile "
                "of a drawn slide kept; means: percentile interval, FID/FSD: recomputed on the pooled features of "
                "the drawn slides, centred on the resamples' mean; widened by sqrt(S/(S-1))")
    return ("tile-level (slide ids unknown): means: percentile bootstrap over tiles; FID/FSD: half-sample "
            "subsampling without replacement")


def score_image_sets(
    real: np.ndarray,
    fakes: Mapping[str, np.ndarray],
    feature_extractors: Mapping[str, FeatureFn] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    fd_boot: int = 100,
    paired: Mapping[str, bool] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    fd_device: str | None = None,
    groups: list[str] | np.ndarray | None = None,
    real_features: Mapping[str, np.ndarray] | None = None,
    return_features: bool = False,
) -> dict[str, Any]:
    """Score fake sets against a real set; 95% intervals on every metric.

    ``feature_extractors`` maps a metric name ("FSD", "FID") to a callable uint8
    (B, 3, H, W) -> (B, D); the FD of each fake set to the real set is computed in
    its feature space. Paired distortion (L1, L2, PSNR, SSIM) is computed for fakes
    that are paired with ``real`` (``paired[name]``; default: same shape), and with
    FSD features PFD, the paired feature distance (``metrics.paired_feature_distance``).

    ``groups``: the slide id of each real tile. With it, every interval of a paired
    set is slide-level (``metrics.cluster_bootstrap_ci``, ``metrics.fd_cluster_interval``:
    ``n_boot`` / ``fd_boot`` slide resamples); without it (or for an unpaired set)
    tile-level (``metrics.bootstrap_ci``, ``metrics.fd_interval``). Each model's
    ``intervals`` says which. The same seed draws the same slides for every model;
    ``fd_device`` (e.g. "cuda") runs the FD resamples in torch float64 there.
    ``real_features``: metric -> real features already extracted (not recomputed).
    Returns a JSON-ready ``summary`` part (``models``, ``warnings``, ``settings``)
    and ``per_image`` numpy arrays (and ``features``: metric -> {"real", model} ->
    (N, D) when ``return_features``).
    """
    progress = progress or NullProgress()
    real = np.asarray(real)
    feature_extractors = dict(feature_extractors or {})
    warnings: list[str] = []
    for name, arr in [("real", real), *fakes.items()]:
        a = np.asarray(arr)
        if a.ndim != 4 or a.shape[1] != 3 or a.dtype != np.uint8:
            raise InputError(f"{name}: need uint8 RGB tiles (N, 3, H, W), got {a.dtype} {a.shape}")
        if feature_extractors and len(a) < 2:
            raise InputError(f"{name}: a Fréchet distance needs at least 2 tiles, got {len(a)}")
    if groups is not None and len(groups) != len(real):
        raise InputError(f"{len(groups)} slide ids for {len(real)} real tiles")
    n_slides = None if groups is None else metrics.cluster_codes(groups)[1]

    def warn(msg: str) -> None:
        if msg not in warnings:
            warnings.append(msg)
            progress.warn(msg)

    if n_slides is not None and n_slides < 2:
        warn(f"all {len(real)} tiles come from 1 slide: no slide-level interval can be had (lo/hi are empty); "
             "score tiles of several slides")
    elif n_slides is not None and n_slides < FEW_SLIDES:
        warn(f"intervals resample only {n_slides} slides: with fewer than {FEW_SLIDES} slides a cluster bootstrap "
             "is rough (it tends to be too narrow); score more slides")

    real_features = dict(real_features or {})
    real_feats = {k: (np.asarray(real_features[k], np.float64) if k in real_features
                      else extract_features(real, fn, batch_size, progress, f"{k} real"))
                  for k, fn in feature_extractors.items()}
    features: dict[str, dict[str, np.ndarray]] = {k: {"real": v} for k, v in real_feats.items()}
    models: dict[str, Any] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    for name, fake in fakes.items():
        fake = np.asarray(fake)
        is_paired = (paired or {}).get(name, fake.shape == real.shape)
        if is_paired and fake.shape != real.shape:
            raise InputError(f"model {name!r}: {fake.shape} fake vs {real.shape} real images cannot be paired")
        by_slide = groups is not None and bool(is_paired)
        res: dict[str, Any] = {"n": len(fake), "paired": bool(is_paired), "intervals": "slides" if by_slide else "tiles",
                               "metrics": {}}

        def mean_ci(v: np.ndarray) -> dict[str, float]:
            if by_slide:
                return _interval(*metrics.cluster_bootstrap_ci(v, groups, n_boot, seed))
            return _interval(*metrics.bootstrap_ci(v, n_boot, seed))

        fake_feats: dict[str, np.ndarray] = {}
        for k, fn in feature_extractors.items():
            ff = fake_feats[k] = extract_features(fake, fn, batch_size, progress, f"{k} {name}")
            features[k][name] = ff
            fd = metrics.fd_from_features(real_feats[k], ff, what=f"{k} features")
            if fd.warning:
                warn(f"{k}: {fd.warning}")
            key = f"boot:{k}:{name}"
            tick = lambda key=key: progress.advance(key)  # noqa: E731
            if by_slide:
                progress.start(key, f"{k} slide resamples {name}", fd_boot)
                lo, hi = metrics.fd_cluster_interval(real_feats[k], ff, groups, None, fd_boot, seed,
                                                     device=fd_device, callback=tick)
                progress.finish(key)
            elif min(len(ff), len(real)) < 3:
                warn(f"{k}: an FD interval needs at least 3 tiles per set; none given")
                lo = hi = float("nan")
            else:
                progress.start(key, f"{k} interval {name}", fd_boot)
                lo, hi = metrics.fd_interval(real_feats[k], ff, fd_boot, seed, paired=is_paired, device=fd_device,
                                             callback=tick)
                progress.finish(key)
            res["metrics"][k] = _interval(fd.value, lo, hi)
        if is_paired:
            per_image[name] = {}
            progress.start(f"dist:{name}", f"L1/L2/PSNR/SSIM {name}", len(metrics.DISTORTION))
            for k, fn in metrics.DISTORTION.items():
                try:
                    v = fn(real, fake)
                except ValueError as e:
                    raise InputError(f"model {name!r}: {e}") from None
                per_image[name][k] = v
                res["metrics"][k] = mean_ci(v)
                progress.advance(f"dist:{name}")
            progress.finish(f"dist:{name}")
            if "FSD" in fake_feats:  # the paired feature distance, in StainNet's feature space
                v = per_image[name]["PFD"] = metrics.paired_feature_distance(real_feats["FSD"], fake_feats["FSD"])
                res["metrics"]["PFD"] = mean_ci(v)
            if np.isinf(per_image[name]["PSNR"]).any():
                warn(f"{name}: {int(np.isinf(per_image[name]['PSNR']).sum())} tiles equal their real tile (PSNR = inf)")
        models[name] = res
    level = "slides" if groups is not None else "tiles"
    out = {
        "n_real": int(len(real)),
        "tile_size": [int(real.shape[2]), int(real.shape[3])],
        "models": models,
        "warnings": warnings,
        "settings": {"n_boot": n_boot, "fd_boot": fd_boot, "seed": seed, "level": 0.95,
                     "intervals": level, "n_slides": n_slides, "interval_method": interval_method(level, n_slides),
                     "fd_interval": (f"slide-level cluster bootstrap, {fd_boot} resamples" if groups is not None else
                                     f"subsampling without replacement, {metrics.FD_SUBSAMPLE_FRACTION:g} of each set")},
        "per_image": per_image,
    }
    if return_features:
        out["features"] = features
    return out


def write_per_image_csv(path: str | Path, results: Mapping[str, Any], names: list[str]) -> None:
    """One row per (model, tile) with the paired distortion metrics and PFD when scored (atomic write)."""
    from vstain_cli.provenance import atomic_output

    per_image = results.get("per_image", {})
    keys = list(metrics.DISTORTION) + (["PFD"] if any("PFD" in v for v in per_image.values()) else [])
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(",".join(["model", "tile", *keys]) + "\n")
        for model, vals in per_image.items():
            for i, n in enumerate(names):
                f.write(",".join([model, n, *(f"{vals[k][i]:.6g}" if k in vals else "" for k in keys)]) + "\n")
