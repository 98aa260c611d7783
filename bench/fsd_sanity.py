"""Does FSD measure tissue? StainNet test accuracy, and FSD against blur and noise on real tiles.

    python bench/fsd_sanity.py [--slides 12] [--size 768] [--tile 64] [--steps 600] [--out DIR]
    python bench/fsd_sanity.py --run phantom-stainnet --dataset vstain-demo/dataset   # a trained StainNet

Makes a phantom dataset (``vstain synth`` + ``vstain tile``, split by slide),
trains two tiny StainNets on its train split for the paper's task (slide
steatosis grade from a patch): the ``tiny-stainnet`` preset with H&E stain
augmentation (HED jitter, data/augment.py) and the same preset without it.
For each it prints the test-split accuracy and confusion matrix (also appended
to the run's metrics.jsonl as a ``"split": "test"`` record) and the FSD between
the real test tiles and

- the same tiles blurred (Gaussian, sigma 0.5-4 px),
- the same tiles with Gaussian pixel noise (sd 4-32 grey levels),
- real tiles of other slides (train split), unchanged: the scale of "different tissue".

A measure of quality must rise monotonically with blur and with noise; each row
says whether it does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLURS = (0.0, 0.5, 1.0, 2.0, 4.0)
NOISES = (0.0, 4.0, 8.0, 16.0, 32.0)


def make_dataset(folder: Path, slides: int, size: int, tile: int, seed: int) -> Path:
    from vstain_cli.data.synth import synth
    from vstain_cli.data.tiling import TileOptions
    from vstain_cli.data.tiling import tile as run_tile

    pairs = synth(folder / "phantom", slides=slides, size=(size, size), channels=4, seed=seed)
    run_tile(pairs, folder / "dataset", TileOptions(size=tile, stride=tile, min_tissue=0.5))
    return folder / "dataset"


def split_tiles(dataset: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, S, S) H&E tiles of a split and their slide labels."""
    from vstain_cli.data.store import open_dataset

    info = open_dataset(dataset)
    he, lab = [], []
    for sid in info.slide_ids(split):
        a = np.asarray(info.arrays(sid)[1])
        he.append(a)
        lab.append(np.full(len(a), info.slides[sid].label))
    return np.concatenate(he), np.concatenate(lab)


def train_stainnet(dataset: Path, out: Path, steps: int, augment: bool, seed: int) -> Path:
    from vstain_cli.train.loop import train
    from vstain_cli.train.presets import load_preset

    p = load_preset("tiny-stainnet")
    if not augment:
        p = dataclasses.replace(p, stainnet=dataclasses.replace(p.stainnet, hed_scale=0.0, hed_shift=0.0))
    p = p.with_train(steps=steps, val_every=steps, checkpoint_every=steps, log_every=max(steps // 10, 1),
                     seed=seed, workers=0)
    train(p, dataset, out, device="cpu", force=True)
    return out


def test_metrics(run: Path, tiles: np.ndarray, labels: np.ndarray, n_classes: int = 4, record: bool = True) -> dict:
    """Accuracy and confusion matrix (rows: true grade, columns: predicted) on ``tiles``."""
    import torch

    from vstain_cli.infer.run import load_run
    from vstain_cli.train import run_folder

    model = load_run(run, "cpu").model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(tiles), 128):
            x = torch.from_numpy(tiles[s : s + 128]).float() / 127.5 - 1.0
            preds.append(model(x).argmax(1).numpy())
    pred = np.concatenate(preds)
    conf = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(conf, (labels, pred), 1)
    rec = {"split": "test", "accuracy": float(np.trace(conf) / conf.sum()), "confusion": conf.tolist(),
           "patches": int(len(tiles))}
    if record:
        run_folder.append_metrics(run, {"step": json.loads((run / "config.json").read_text())["preset"]["train"]["steps"],
                                        **rec})
    return rec


def blur(tiles: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if sigma == 0:
        return tiles
    return np.clip(gaussian_filter(tiles.astype(np.float32), (0, 0, sigma, sigma), mode="reflect") + 0.5,
                   0, 255).astype(np.uint8)


def noise(tiles: np.ndarray, sd: float, seed: int) -> np.ndarray:
    if sd == 0:
        return tiles
    rng = np.random.default_rng(seed)
    return np.clip(tiles + rng.normal(0, sd, tiles.shape) + 0.5, 0, 255).astype(np.uint8)


def report(run, test: np.ndarray, test_lab: np.ndarray, other: np.ndarray, seed: int, *, name: str = "",
           seconds: float | None = None, record: bool = True) -> None:
    """Print a StainNet's test accuracy and confusion, and FSD against blur, noise and other slides."""
    from vstain_cli.infer.run import load_run
    from vstain_cli.score.metrics import fd_from_features
    from vstain_cli.score.scoring import extract_features, stainnet_extractor

    run = load_run(run, "cpu").path
    m = test_metrics(run, test, test_lab, record=record)
    took = f" (trained in {seconds:.0f} s)" if seconds is not None else ""
    print(f"\nStainNet {name}{took}: test accuracy {m['accuracy']:.3f} "
          f"on {m['patches']} tiles; confusion (rows true grade 0-3, columns predicted): {m['confusion']}")
    fn = stainnet_extractor(run, "cpu")
    ref = extract_features(test, fn)

    def fsd(tiles: np.ndarray) -> float:
        return fd_from_features(ref, extract_features(tiles, fn)).value

    rows = [("blur sigma (px)", BLURS, [fsd(blur(test, s)) for s in BLURS]),
            ("noise sd (levels)", NOISES, [fsd(noise(test, s, seed)) for s in NOISES])]
    for label, xs, ys in rows:
        mono = all(b > a for a, b in zip(ys, ys[1:]))
        print(f"  {label:18s} " + "  ".join(f"{x:>5g}: {y:7.3f}" for x, y in zip(xs, ys))
              + f"   rises monotonically: {'yes' if mono else 'NO'}")
    print(f"  real tiles of other slides (unchanged): FSD {fsd(other):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the dataset and runs here")
    ap.add_argument("--run", default=None, help="check this trained StainNet run (folder or bundled name) instead")
    ap.add_argument("--dataset", type=Path, default=None, help="with --run: the dataset it was trained on")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from vstain_cli.data.synth import PHANTOM_VERSION

    if args.run is not None:
        if args.dataset is None:
            raise SystemExit("--run needs --dataset")
        test, test_lab = split_tiles(args.dataset, "test")
        other, _ = split_tiles(args.dataset, "train")
        print(f"StainNet {args.run} on {args.dataset}: test {len(test)} tiles "
              f"(grades {np.bincount(test_lab, minlength=4).tolist()}), other slides {len(other)} tiles")
        report(args.run, test, test_lab, other, args.seed, record=False)
        return
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="vstain-fsd-")
        args.out = Path(tmp.name)
    t0 = time.perf_counter()
    dataset = make_dataset(args.out, args.slides, args.size, args.tile, args.seed)
    test, test_lab = split_tiles(dataset, "test")
    other, _ = split_tiles(dataset, "train")
    print(f"phantom {PHANTOM_VERSION}: {args.slides} slides {args.size}^2 px, {args.tile} px tiles; "
          f"test {len(test)} tiles (grades {np.bincount(test_lab, minlength=4).tolist()} tiles), "
          f"other slides {len(other)} tiles; {args.steps} steps; setup {time.perf_counter() - t0:.0f} s")
    for augment in (True, False):
        name = "with stain augmentation" if augment else "without augmentation"
        t = time.perf_counter()
        run = train_stainnet(dataset, args.out / f"stainnet-{'aug' if augment else 'plain'}", args.steps,
                             augment, args.seed)
        report(run, test, test_lab, other, args.seed, name=name, seconds=time.perf_counter() - t)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
