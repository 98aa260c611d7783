"""Autofluorescence of the phantom: endogenous fluorophores, their emission spectra, optics and noise.

Emission peaks and widths of tissue fluorophores (Croce & Bottiroli 2014,
*Eur J Histochem* 58:2461, Table 1; Monici 2005, *Biotechnol Annu Rev* 11:227),
modelled as Gaussians in wavelength over the channels' emission bands (channel
c of C at 420 + 280 c / (C - 1) nm):

    fluorophore          em. peak (nm)  FWHM (nm)  where in the phantom
    NAD(P)H              460            110        hepatocyte cytoplasm (mitochondria-rich), less in nuclei
    flavins (FAD)        530            100        hepatocyte cytoplasm, duct and muscle cells
    collagen             405            100        portal tracts, vessel walls, perisinusoidal fibrosis
    elastin              440            110        arterial elastic lamina, vein walls
    lipofuscin           590            160        granules in zone-3 hepatocytes (bright, broad)
    retinoids (vit. A)   495             90        lipid droplets (retinyl esters)

Counts: ``gain * brightness * (abundances @ spectra) + dark offset`` after an
optical blur (Gaussian PSF, sigma 1.1 um: the AF detail limit is coarser than
chromatin, cytoplasm granules and the thin sinusoid borders), with photon shot
noise (variance = signal) and read noise, as uint16. The H&E-only detail of
stains.py is not in these maps at all.
"""

from __future__ import annotations

import numpy as np

# name: (peak nm, FWHM nm, relative brightness per unit abundance)
FLUOROPHORES = {
    "nadh": (460.0, 110.0, 1.0),
    "fad": (530.0, 100.0, 0.7),
    "collagen": (405.0, 100.0, 1.7),
    "elastin": (440.0, 110.0, 2.0),
    "lipofuscin": (590.0, 160.0, 3.0),
    "retinoid": (495.0, 90.0, 0.8),
    "background": (520.0, 400.0, 0.04),   # glass, mountant: faint and flat
}
# fluorophore abundance per unit of each layout component
ABUNDANCE = {
    "cyto": {"nadh": 1.0, "fad": 0.8},
    "balloon": {"nadh": -0.5, "fad": -0.4},   # rarefied cytoplasm of ballooned cells
    "nucleus": {"nadh": 0.25, "fad": 0.1},
    "fat": {"retinoid": 0.6, "nadh": 0.05},
    "lumen": {"nadh": 0.06},
    "rbc": {"nadh": 0.02},                     # hemoglobin absorbs: red cells are dark
    "collagen": {"collagen": 1.0, "elastin": 0.1},
    "elastin": {"elastin": 1.0},
    "muscle": {"nadh": 0.5, "fad": 0.5, "collagen": 0.1},
    "duct": {"nadh": 0.6, "fad": 0.4},
    "lipofuscin": {"lipofuscin": 1.0},
}
PSF_SIGMA_UM = 1.1
DARK_OFFSET = 180.0
FULL_SCALE = 2400.0


def wavelengths(channels: int) -> np.ndarray:
    """Emission band centres (nm) of the AF channels."""
    if channels == 1:
        return np.array([500.0], np.float32)
    return np.linspace(420.0, 700.0, channels, dtype=np.float32)


def emission_spectra(channels: int) -> np.ndarray:
    """(fluorophores, channels) emission spectra, Gaussian in wavelength, scaled by brightness."""
    lam = wavelengths(channels)
    rows = []
    for peak, fwhm, bright in FLUOROPHORES.values():
        sd = fwhm / 2.3548  # FWHM = 2 sqrt(2 ln 2) sigma
        rows.append(bright * np.exp(-0.5 * ((lam - peak) / sd) ** 2))
    return np.stack(rows).astype(np.float32)


def fluorophore_maps(m: dict[str, np.ndarray], amounts: np.ndarray) -> np.ndarray:
    """(rows, width, fluorophores) abundances from layout maps; ``amounts`` scales each fluorophore per slide."""
    names = list(FLUOROPHORES)
    shape = m["tissue"].shape
    out = np.zeros((*shape, len(names)), np.float32)
    for comp, mix in ABUNDANCE.items():
        for fl, a in mix.items():
            out[..., names.index(fl)] += np.float32(a) * m[comp]
    out[..., names.index("background")] = 1.0
    np.maximum(out, 0.0, out=out)
    out *= amounts.astype(np.float32)
    return out
