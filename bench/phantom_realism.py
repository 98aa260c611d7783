"""How close the phantom H&E is to real H&E: stain-density and texture statistics of tissue patches.

    python bench/phantom_realism.py [--patch 64] [--slides 4] [--size 768] [--calibrate] [--picture docs/img/phantom-vs-real.png]

Real H&E: tests/data/CMU-1-Small-Region.svs (read with OpenSlide, 0.499 um/px).
Per 64 x 64 tissue patch (HSV saturation > 0.07 on > 60 % of the patch), 14
features: mean, sd, 10th and 90th percentile of the hematoxylin and eosin optical
densities (colour deconvolution, ``skimage.color.rgb2hed``: Ruifrok & Johnston
2001), mean RGB optical density (3), and texture: mean gradient magnitude of the
H and E densities and the mean absolute Laplacian of the grey image. Features are
z-scored with the real slide's mean and sd; the distance between two patch sets
is the Frechet distance between Gaussians fitted to their features (as FID).

Printed in the same run, as the scale: real vs real (patches on alternating grid
squares of the slide, and top half vs bottom half), real vs the same slide
recoloured as an IHC stain (eosin density moved to DAB: ``hed2rgb``), real vs
``skimage.data.immunohistochemistry()`` (a real IHC image), and the phantom vs
real. ``--calibrate`` also prints the colour statistics the phantom's stains.py
is calibrated from (glass intensity, Macenko stain vectors, H/E density
percentiles of nuclei and of eosinophilic tissue).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"
sys.path.insert(0, str(ROOT))


def read_real() -> np.ndarray:
    import openslide

    s = openslide.OpenSlide(str(REAL))
    return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def read_phantom(folder: Path, slides: int, size: int, seed: int) -> list[np.ndarray]:
    import openslide

    from vstain_cli.data.synth.render import synth

    csv = synth(folder, slides=slides, size=(size, size), channels=4, seed=seed)
    out = []
    for i in range(slides):
        s = openslide.OpenSlide(str(csv.parent / f"phantom-{i:03d}.he.tif"))
        out.append(np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")))
    return out


def tissue_patches(img: np.ndarray, patch: int, min_tissue: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping tissue patches (N, p, p, 3) and their grid positions (N, 2)."""
    from skimage.color import rgb2hsv

    sat = rgb2hsv(img)[..., 1] > 0.07
    h, w = img.shape[:2]
    pats, pos = [], []
    for y in range(0, h - patch + 1, patch):
        for x in range(0, w - patch + 1, patch):
            if sat[y : y + patch, x : x + patch].mean() > min_tissue:
                pats.append(img[y : y + patch, x : x + patch])
                pos.append((y // patch, x // patch))
    return np.asarray(pats), np.asarray(pos).reshape(-1, 2)


def features(pats: np.ndarray) -> np.ndarray:
    """14 stain-density and texture statistics per patch."""
    from scipy.ndimage import laplace, sobel
    from skimage.color import rgb2hed

    out = []
    for p in pats:
        hed = rgb2hed(p)
        hh, ee = hed[..., 0], hed[..., 1]
        od = -np.log10(np.clip(p.astype(np.float64), 1, 255) / 255.0)
        grey = p.astype(np.float64).mean(-1)
        f = []
        for ch in (hh, ee):
            f += [ch.mean(), ch.std(), np.percentile(ch, 10), np.percentile(ch, 90)]
        f += list(od.reshape(-1, 3).mean(0))
        f += [np.hypot(sobel(hh, 0), sobel(hh, 1)).mean(), np.hypot(sobel(ee, 0), sobel(ee, 1)).mean(),
              np.abs(laplace(grey)).mean()]
        out.append(f)
    return np.asarray(out)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows)."""
    from scipy.linalg import sqrtm

    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s = sqrtm(ca @ cb)
    return float(np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2 * np.real(s)))


def ihc_recolour(img: np.ndarray) -> np.ndarray:
    """The slide as an IHC stain: hematoxylin kept, eosin density moved to DAB."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    ihc = np.stack([hed[..., 0], np.zeros_like(hed[..., 0]), hed[..., 1]], -1)
    return (np.clip(hed2rgb(ihc), 0, 1) * 255).astype(np.uint8)


def macenko(img: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stain vectors after Macenko et al. 2009 (unit OD vectors, log10), and the glass intensity."""
    from skimage.color import rgb2hsv

    glass = rgb2hsv(img)[..., 1] < 0.03
    i0 = np.median(img[glass & (img.mean(-1) > 200)], axis=0)
    od = -np.log10(np.clip(img.reshape(-1, 3).astype(np.float64), 1, None) / i0)
    od = od[(od > beta).all(1)]
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    plane = vt[:2].T * np.sign(vt[0].sum())  # first axis along the mean OD: angles near 0, no wrap
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = v1 * np.sign(v1.sum()), v2 * np.sign(v2.sum())
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # hematoxylin absorbs red most
    return h / np.linalg.norm(h), e / np.linalg.norm(e), i0


def calibrate(img: np.ndarray) -> None:
    """Print the colour statistics stains.py is calibrated from."""
    from skimage.color import rgb2hed, rgb2hsv

    h, e, i0 = macenko(img)
    print(f"glass intensity I0 (median RGB of unsaturated bright pixels): {np.round(i0, 1).tolist()}")
    print(f"Macenko hematoxylin OD vector (unit, log10): {np.round(h, 3).tolist()}")
    print(f"Macenko eosin OD vector (unit, log10):       {np.round(e, 3).tolist()}")
    tissue = rgb2hsv(img)[..., 1] > 0.07
    # concentrations in the Macenko basis (least squares), OD in log10 units
    od = -np.log10(np.clip(img.astype(np.float64), 1, None) / i0)[tissue]
    conc = np.linalg.lstsq(np.stack([h, e], 1), od.T, rcond=None)[0].T
    hc, ec = conc[:, 0], conc[:, 1]
    nuc = hc > np.percentile(hc, 90)
    print(f"tissue pixels: {tissue.mean():.3f} of the slide")
    print("H density (Macenko basis) percentiles 10/50/90/99 in tissue:",
          np.round(np.percentile(hc, [10, 50, 90, 99]), 3).tolist())
    print("E density (Macenko basis) percentiles 10/50/90/99 in tissue:",
          np.round(np.percentile(ec, [10, 50, 90, 99]), 3).tolist())
    print("nuclei (top 10 % H): median H, E:", np.round([np.median(hc[nuc]), np.median(ec[nuc])], 3).tolist())
    stroma = (~nuc) & (ec > np.percentile(ec, 50))
    print("eosinophilic tissue (E above median, not nuclei): median H, E:",
          np.round([np.median(hc[stroma]), np.median(ec[stroma])], 3).tolist())
    hed = rgb2hed(img)[tissue]
    print("rgb2hed (Ruifrok & Johnston) H, E percentiles 10/50/90 in tissue:",
          np.round(np.percentile(hed[:, 0], [10, 50, 90]), 3).tolist(),
          np.round(np.percentile(hed[:, 1], [10, 50, 90]), 3).tolist())


def picture(phantom: np.ndarray, real: np.ndarray, path: Path, crop: int = 384) -> None:
    """Side-by-side phantom | real crops at the same scale."""
    from PIL import Image

    cy, cx = phantom.shape[0] // 2 - crop // 2, phantom.shape[1] // 2 - crop // 2
    ph = phantom[cy : cy + crop, cx : cx + crop]
    r = real[2000 : 2000 + crop, 900 : 900 + crop]  # dermis and epidermis, all tissue
    gap = np.full((crop, 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([ph, gap, r], 1)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--picture", type=Path, default=None, help="write a phantom | real PNG here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    real = read_real()
    if args.calibrate:
        calibrate(real)
    pats, pos = tissue_patches(real, args.patch)
    fr = features(pats)
    mu, sd = fr.mean(0), fr.std(0) + 1e-9

    def z(f: np.ndarray) -> np.ndarray:
        return (f - mu) / sd

    checker = (pos.sum(1) % 2) == 0
    top = pos[:, 0] < np.median(pos[:, 0])
    rows = [
        ("real vs real (alternating grid squares)", frechet(z(fr[checker]), z(fr[~checker])), int(checker.sum())),
        ("real vs real (top half vs bottom half)", frechet(z(fr[top]), z(fr[~top])), int(top.sum())),
    ]
    ihc_pats, _ = tissue_patches(ihc_recolour(real), args.patch)
    rows.append(("real vs IHC recolouring of real (E -> DAB)", frechet(z(fr), z(features(ihc_pats))), len(ihc_pats)))
    from skimage.data import immunohistochemistry

    ihc2, _ = tissue_patches(immunohistochemistry(), args.patch)
    rows.append(("real vs skimage.data.immunohistochemistry()", frechet(z(fr), z(features(ihc2))), len(ihc2)))
    with tempfile.TemporaryDirectory(prefix="vstain-realism-") as tmp:
        phantoms = read_phantom(Path(tmp), args.slides, args.size, args.seed)
    ph = np.concatenate([tissue_patches(p, args.patch)[0] for p in phantoms])
    fp = features(ph)
    rows.append(("phantom vs real", frechet(z(fr), z(fp)), len(ph)))
    import vstain_cli.data.synth as synth_pkg

    print(f"phantom {getattr(synth_pkg, 'PHANTOM_VERSION', '(no version)')}: {args.slides} slides of {args.size}^2 px; real: {REAL.name}, "
          f"{len(pats)} tissue patches of {args.patch} px")
    print(f"{'pair':52s} {'Frechet distance':>16s} {'patches':>8s}")
    for name, d, n in rows:
        print(f"{name:52s} {d:16.2f} {n:8d}")
    names = ["H mean", "H sd", "H p10", "H p90", "E mean", "E sd", "E p10", "E p90", "OD R", "OD G", "OD B",
             "grad H", "grad E", "|lap| grey"]
    print("per-feature mean (z units, real = 0):",
          ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, z(fp).mean(0))))
    if args.picture:
        picture(phantoms[min(2, len(phantoms) - 1)], real, args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
