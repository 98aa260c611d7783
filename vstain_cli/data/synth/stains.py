"""H&E optical densities of the phantom's components and their Beer-Lambert rendering.

Colour model (Ruifrok & Johnston 2001, *Anal Quant Cytol Histol* 23:291): the
optical density of each RGB channel is a sum over stains of concentration x
unit stain vector, OD = H h + E e (log10 units), and the transmitted light is
RGB = I0 10^(-OD) (Beer-Lambert).

Calibration, measured on the real H&E slide tests/data/CMU-1-Small-Region.svs
by ``python bench/phantom_realism.py --calibrate`` (Macenko et al. 2009 stain
vectors, concentrations in that basis, tissue = HSV saturation > 0.07):

    glass intensity I0 (median RGB):          [246, 243, 243]
    hematoxylin unit OD vector:               [0.809, 0.493, 0.320]
    eosin unit OD vector:                     [0.229, 0.869, 0.438]
    H percentiles 10/50/90/99 in tissue:      [-0.03, 0.11, 0.50, 1.24]
    E percentiles 10/50/90/99 in tissue:      [ 0.11, 0.41, 0.75, 1.38]
    nuclei (top 10 % of H): median H, E:      0.69, 0.70
    eosinophilic tissue: median H, E:         0.15, 0.55

For comparison, Ruifrok & Johnston's published vectors (skimage.color.rgb_from_hed)
are h = [0.65, 0.70, 0.29], e = [0.07, 0.99, 0.11] (before normalisation).
Per-slide stain variation: concentration scales and vector tilts of the size
used for H&E stain augmentation (Tellez et al. 2018: HED scale 0.95-1.05 per
pixel is their mild setting, whole-slide differences between labs reach
+-30 %); here H x U(0.8, 1.25), E x U(0.75, 1.3), each vector component
x U(0.92, 1.08) then renormalised, I0 +- 4 levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

H_VECTOR = np.array([0.809, 0.493, 0.320], np.float32)
E_VECTOR = np.array([0.229, 0.869, 0.438], np.float32)
GLASS_I0 = np.array([246.0, 243.0, 243.0], np.float32)

# (H, E) densities per unit of each component, in the calibrated basis above.
DENSITY = {
    "nucleus": (0.45, 0.3),
    "lymph": (0.55, 0.05),     # added on top of "nucleus": dense small lymphocyte nuclei
    "cyto": (0.09, 0.5),
    "collagen": (0.10, 0.62),
    "muscle": (0.14, 0.72),
    "duct": (0.16, 0.30),
    "membrane": (0.05, 0.14),
    "lumen": (0.02, 0.08),
    "rbc": (0.04, 1.00),
    "lipofuscin": (0.12, 0.18),
    "elastin": (0.10, 0.55),
}


@dataclass(frozen=True)
class StainStyle:
    """One slide's staining: unit OD vectors, concentration scales and glass intensity."""

    h_vector: tuple[float, float, float]
    e_vector: tuple[float, float, float]
    h_scale: float
    e_scale: float
    i0: tuple[float, float, float]

    @classmethod
    def random(cls, rng: np.random.Generator) -> "StainStyle":
        def tilt(v: np.ndarray) -> tuple[float, float, float]:
            t = v * rng.uniform(0.92, 1.08, 3)
            return tuple(float(x) for x in t / np.linalg.norm(t))

        return cls(tilt(H_VECTOR), tilt(E_VECTOR), float(rng.uniform(0.8, 1.25)), float(rng.uniform(0.75, 1.3)),
                   tuple(float(x) for x in np.clip(GLASS_I0 + rng.uniform(-4, 4, 3), 0, 255)))


def densities(m: dict[str, np.ndarray], thickness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentrations (rows, width) from the layout maps.

    H&E-only detail lives here: chromatin clumps, rim and nucleolus modulate the
    nuclear H; cytoplasm granularity and cell-to-cell tone modulate E; ballooned
    cells are pale with rarefied strands; fat droplets are empty (lipid is
    dissolved in processing) with a thin rim.
    """
    grain = m["grain"]
    h = np.zeros_like(grain)
    e = np.zeros_like(grain)
    for k, (hd, ed) in DENSITY.items():
        if k == "cyto":
            continue
        h += np.float32(hd) * m[k]
        e += np.float32(ed) * m[k]
    h += np.float32(0.8) * m["chromatin"]
    strands = np.clip((grain - 0.45) * 3.0, 0.0, 1.0)
    cyto_e = m["cyto"] * (0.45 + 1.1 * grain) * (1.0 - m["balloon"] * (0.75 - 0.5 * strands))
    cyto_h = m["cyto"] * (0.7 + 0.6 * grain) * (1.0 - 0.5 * m["balloon"])
    hd, ed = DENSITY["cyto"]
    h += np.float32(hd) * cyto_h
    e += np.float32(ed) * cyto_e
    rim = np.clip(m["fat"] * (1.0 - m["fat"]) * 4.0, 0.0, 1.0) * m["tissue"]
    e += np.float32(0.2) * rim
    return h * thickness, e * thickness


def to_rgb(h: np.ndarray, e: np.ndarray, style: StainStyle) -> np.ndarray:
    """Beer-Lambert: RGB = I0 10^-(H h_vec + E e_vec), float32 (rows, width, 3)."""
    hv = np.asarray(style.h_vector, np.float32) * np.float32(style.h_scale * np.log(10))
    ev = np.asarray(style.e_vector, np.float32) * np.float32(style.e_scale * np.log(10))
    od = h[..., None] * hv + e[..., None] * ev
    return np.exp(-od) * np.asarray(style.i0, np.float32)
