"""Phantom co-registered AF + H&E slide pairs of liver tissue (``vstain synth``): orchestration.

histology.py lays out the tissue (lobules, hepatocytes, sinusoids, vessels,
portal tracts, steatosis by grade, NASH features); stains.py turns it into H&E
optical densities (Beer-Lambert, calibrated stain vectors, per-slide stain
variation); af.py into fluorophore abundances and emission spectra. Here a
strip of rows is laid out with a margin, blurred by each instrument's optics
(AF microscope, slide scanner), given shot/read or camera noise, and cropped:
every pixel is a pure function of (seed, position), whatever the strip split.
"""

from __future__ import annotations

import csv
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy.ndimage import gaussian_filter

from vstain_cli import seeding
from vstain_cli.data.synth import af as afm
from vstain_cli.data.synth import fields, histology, stains
from vstain_cli.data.synth.version import PHANTOM_VERSION
from vstain_cli.errors import InputError
from vstain_cli.io.tiff import write_pyramids
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, check_output_file, record, write_json

STRIP = 256
SCANNER_SIGMA_UM = 0.25  # slide scanner PSF (20x, NA 0.75) plus focus, on transmitted light
COMPONENTS = histology.MAPS


@dataclass
class SlideSpec:
    """Everything that determines one phantom slide pair."""

    slide_id: str
    label: int
    height: int
    width: int
    channels: int
    mpp: float
    seed: int
    gain: float = 1.0
    histology: histology.Params | None = None
    stain: stains.StainStyle | None = None
    fluorophore_amounts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        rng = seeding.numpy_rng(self.seed, 101)
        if self.histology is None:
            self.histology = histology.Params.for_grade(self.label, rng)
        if self.stain is None:
            self.stain = stains.StainStyle.random(rng)
        if not self.fluorophore_amounts:
            self.fluorophore_amounts = tuple(float(x) for x in rng.uniform(0.85, 1.15, len(afm.FLUOROPHORES)))

    @classmethod
    def random(cls, slide_id: str, label: int, height: int, width: int, channels: int, mpp: float,
               seed: int) -> "SlideSpec":
        rng = seeding.numpy_rng(seed, 102)
        return cls(slide_id, label, height, width, channels, mpp, seed, gain=float(rng.uniform(0.75, 1.3)))


@dataclass
class Strip:
    """One rendered strip: AF (rows, W, C) and H&E (rows, W, 3), plus the tissue mask."""

    af: np.ndarray
    he: np.ndarray
    tissue: np.ndarray = field(repr=False)


class PhantomRenderer:
    """Renders strips of one phantom slide pair."""

    def __init__(self, spec: SlideSpec, noise: fields.NoiseTable | None = None):
        self.spec = spec
        self.noise = noise or _shared_noise()
        um = 1.0 / spec.mpp
        self.sigma_af = afm.PSF_SIGMA_UM * um
        self.sigma_scan = SCANNER_SIGMA_UM * um
        # gaussian_filter reaches int(4 sigma + 0.5) px: a strip's margin must cover it
        self.margin = int(4.0 * max(self.sigma_af, self.sigma_scan) + 0.5) + 1
        spectra = afm.emission_spectra(spec.channels) * np.float32(afm.FULL_SCALE * spec.gain)
        # last row: the dark offset (+0.5 so the cast to uint16 rounds)
        self._spectra_offset = np.vstack([spectra, np.full((1, spec.channels), afm.DARK_OFFSET + 0.5, np.float32)])
        self._amounts = np.asarray(spec.fluorophore_amounts, np.float32)

    def layout(self, y0: int, rows: int) -> dict[str, np.ndarray]:
        """Component maps of rows ``y0 .. y0+rows`` (histology.layout)."""
        s = self.spec
        return histology.layout(s.histology, s.seed, s.mpp, s.height, s.width, y0, rows)

    def render(self, y0: int, rows: int) -> Strip:
        """Render rows ``y0 .. y0+rows`` of the slide."""
        s = self.spec
        a = max(0, y0 - self.margin)
        b = min(s.height, y0 + rows + self.margin)
        m = self.layout(a, b - a)
        crop = slice(y0 - a, y0 - a + rows)
        # section thickness varies slowly: scales every stain and fluorophore alike
        thick = 0.85 + 0.3 * fields.value_noise(a, b - a, s.width, 150.0 / s.mpp, s.seed * 31 + 9)

        fl = afm.fluorophore_maps(m, self._amounts)
        fl[..., :-1] *= thick[..., None]
        fl = gaussian_filter(fl, (self.sigma_af, self.sigma_af, 0), mode="nearest")[crop]
        af = self._counts(y0, fl)

        h, e = stains.densities(m, thick)
        rgb = stains.to_rgb(h, e, s.stain)
        rgb = gaussian_filter(rgb, (self.sigma_scan, self.sigma_scan, 0), mode="nearest")[crop]
        he = self._camera(y0, rgb)
        return Strip(af, he, m["tissue"][crop])

    def _counts(self, y0: int, fl: np.ndarray) -> np.ndarray:
        """AF counts: abundances @ spectra + dark offset, with shot + read noise (uint16).

        Photon shot noise has variance equal to the signal (gain 1 count per
        photo-electron); read noise is folded into the offset term of the
        variance. One row at a time: cache-sized, and noise keyed by row.
        """
        s = self.spec
        rows, w, k = fl.shape
        c = s.channels
        abund = np.empty((w, k + 1), np.float32)
        abund[:, -1] = 1.0
        out = np.empty((rows, w, c), np.uint16)
        sig = np.empty((w, c), np.float32)
        sd = np.empty((w, c), np.float32)
        for r in range(rows):
            abund[:, :-1] = fl[r]
            np.matmul(abund, self._spectra_offset, out=sig)
            np.sqrt(sig, out=sd)
            sd *= self.noise.draw(w * c, (s.seed, y0 + r, 11)).reshape(w, c)
            sig += sd
            np.clip(sig, 0, 65535, out=sig)
            np.copyto(out[r], sig, casting="unsafe")
        return out

    def _camera(self, y0: int, rgb: np.ndarray) -> np.ndarray:
        """Scanner camera noise (sd 0.6 + 0.08 sqrt(I) levels: read + shot), uint8."""
        s = self.spec
        rows, w, _ = rgb.shape
        cam = np.stack([self.noise.draw(w * 3, (s.seed, y0 + r, 12)) for r in range(rows)]).reshape(rows, w, 3)
        out = rgb + cam * (np.float32(0.6) + np.float32(0.08) * np.sqrt(rgb))
        np.clip(out, 0, 255, out=out)
        return (out + np.float32(0.5)).astype(np.uint8)


_NOISE: fields.NoiseTable | None = None
_NOISE_LOCK = threading.Lock()


def _shared_noise() -> fields.NoiseTable:
    global _NOISE
    with _NOISE_LOCK:
        if _NOISE is None:
            _NOISE = fields.NoiseTable()
        return _NOISE


def render_strips(renderer: PhantomRenderer, workers: int = 2, strip: int = STRIP) -> Iterator[Strip]:
    """Strips of a slide in order, rendered ``workers`` at a time (numpy releases the GIL)."""
    h = renderer.spec.height
    starts = list(range(0, h, strip))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = []
        for y in starts:
            pending.append(pool.submit(renderer.render, y, min(strip, h - y)))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def write_pair(
    spec: SlideSpec,
    af_path: Path,
    he_path: Path,
    *,
    workers: int = 2,
    af_compression: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Render one phantom pair and write AF (OME-TIFF) and H&E (pyramidal TIFF) by strips."""
    progress = progress or NullProgress()
    renderer = PhantomRenderer(spec)
    meta = {"phantom": asdict(spec), "phantom_version": PHANTOM_VERSION, "components": list(COMPONENTS),
            "fluorophores": list(afm.FLUOROPHORES), "af_wavelengths_nm": afm.wavelengths(spec.channels).tolist()}

    def strips() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for st in render_strips(renderer, workers):
            progress.advance(spec.slide_id, st.af.shape[0])
            yield st.af, st.he

    common = {"height": spec.height, "width": spec.width, "mpp": spec.mpp}
    write_pyramids(
        [
            {"path": af_path, "samples": spec.channels, "dtype": np.uint16, "compression": af_compression,
             "subifds": True, "min_level_size": 512, "ome_channels": [f"AF{i:02d}" for i in range(spec.channels)],
             "metadata": {**meta, "modality": "AF"}, **common},
            {"path": he_path, "samples": 3, "dtype": np.uint8, "compression": "jpeg", "quality": 90,
             "metadata": {**meta, "modality": "H&E"}, **common},
        ],
        strips(),
    )


def synth(
    out: str | Path,
    slides: int = 4,
    size: tuple[int, int] = (4096, 4096),
    channels: int = 26,
    mpp: float = 0.5,
    seed: int = 0,
    *,
    workers: int = 2,
    af_compression: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write ``slides`` phantom pairs and ``pairs.csv`` into ``out``; returns the CSV path.

    Labels cycle 0, 1, 2, 3 so every steatosis grade is present. Existing pairs
    with the same spec are kept (an interrupted run resumes).
    """
    progress = progress or NullProgress()
    out = Path(out)
    h, w = size
    if slides < 1:
        raise InputError("--slides must be at least 1")
    if h < 64 or w < 64:
        raise InputError("--size must be at least 64 x 64")
    if channels < 1 or channels > 512:
        raise InputError("--channels must be between 1 and 512")
    if not (0.05 <= mpp <= 20):
        raise InputError("--mpp must be between 0.05 and 20 microns per pixel")
    csv_path = out / "pairs.csv"
    check_output_file(csv_path, force)
    rows = []
    for i in range(slides):
        sid = f"phantom-{i:03d}"
        spec = SlideSpec.random(sid, i % 4, h, w, channels, mpp, seed * 100003 + i)
        af_path, he_path = out / f"{sid}.af.ome.tif", out / f"{sid}.he.tif"
        progress.start(sid, f"synth {sid} (label {spec.label})", h)
        write_pair(spec, af_path, he_path, workers=workers, af_compression=af_compression, progress=progress)
        progress.finish(sid)
        rows.append([sid, af_path.name, he_path.name, spec.label])
    with atomic_output(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["slide_id", "af", "he", "label"])
            wr.writerows(rows)
    prov = record({"slides": slides, "size": [h, w], "channels": channels, "mpp": mpp, "seed": seed,
                   "af_compression": af_compression, "phantom_version": PHANTOM_VERSION})
    prov["phantom_version"] = PHANTOM_VERSION
    write_json(out / "synth.json", prov)
    return csv_path


def megapixels(size: tuple[int, int], slides: int) -> float:
    """Slide area in megapixels (for speed reports)."""
    return slides * size[0] * size[1] / 1e6

