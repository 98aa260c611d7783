"""Phantom co-registered AF + H&E slide pairs of liver tissue (``vstain synth``).

The phantom is built from components with their own optics:

- tissue with irregular borders and holes (vessels, tears) on glass;
- hepatocyte cytoplasm in cords, separated by sinusoids;
- nuclei with random chromatin texture (+ some small inflammatory nuclei);
- macrovesicular fat droplets whose density follows the slide label 0-3
  (steatosis grade: <5 %, 5-33 %, 34-66 %, >66 % of parenchyma), and small
  microvesicular droplets whose density also follows it;
- collagen bands (portal tracts / septa).

AF: each component has an emission spectrum over C channels; counts are
``gain * abundance @ spectra + offset`` with shot + read noise (uint16).
H&E: Beer-Lambert rendering of hematoxylin and eosin optical densities with
per-slide stain variation. Chromatin texture, cytoplasm granularity and red
cells are drawn in H&E only — the AF does not determine them, so the AF -> H&E
mapping is stochastic, as in real tissue.
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

from vstain_cli.data.synth import fields
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.io.tiff import write_pyramids
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, ensure_writable_dir, record, write_json

STRIP = 256
# Fraction of parenchyma occupied by fat droplets for labels 0..3 (steatosis grade).
FAT_CELL_PROBABILITY = (0.02, 0.25, 0.55, 0.95)
# Probability of a small (microvesicular) droplet per 9 um cell for labels 0..3: makes
# the grade visible in small patches too, as in NASH where both forms occur.
MICRO_FAT_PROBABILITY = (0.01, 0.12, 0.30, 0.55)
# Beer-Lambert optical density vectors (per unit stain) for RGB, after
# Ruifrok & Johnston 2001 (skimage.color.rgb_from_hed rows, log10 units).
HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], np.float32)
EOSIN_OD = np.array([0.07, 0.99, 0.11], np.float32)
COMPONENTS = ("cytoplasm", "nucleus", "collagen", "fat", "sinusoid", "glass")


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
    h_strength: float = 1.0
    e_strength: float = 1.0
    stain_tilt: float = 0.0

    @classmethod
    def random(cls, slide_id: str, label: int, height: int, width: int, channels: int, mpp: float, seed: int) -> "SlideSpec":
        rng = np.random.default_rng([seed, 101])
        return cls(
            slide_id, label, height, width, channels, mpp, seed,
            gain=float(rng.uniform(0.75, 1.3)),
            h_strength=float(rng.uniform(0.8, 1.25)),
            e_strength=float(rng.uniform(0.75, 1.25)),
            stain_tilt=float(rng.uniform(-0.08, 0.08)),
        )


def emission_spectra(channels: int) -> np.ndarray:
    """(components, channels) emission spectra: Gaussians over the channel index.

    Collagen is bright and blue-shifted, cytoplasm (NAD(P)H/flavins) mid-band,
    nuclei dim, lipid dim and red-shifted, blood in sinusoids absorbs, glass ~0.
    """
    c = np.linspace(0.0, 1.0, channels, dtype=np.float32)

    def g(mu: float, sd: float, amp: float) -> np.ndarray:
        return amp * np.exp(-0.5 * ((c - mu) / sd) ** 2)

    return np.stack([
        g(0.50, 0.22, 1.00),                       # cytoplasm
        g(0.45, 0.30, 0.30),                       # nucleus
        g(0.22, 0.16, 1.70) + g(0.6, 0.3, 0.2),    # collagen
        g(0.75, 0.20, 0.35),                       # fat (lipid)
        g(0.40, 0.30, 0.12),                       # sinusoid / blood
        g(0.50, 0.50, 0.04),                       # glass
    ]).astype(np.float32)


class _Sprites:
    """Banks of nucleus and droplet sprites shared by all strips of a slide."""

    def __init__(self, mpp: float, seed: int):
        rng = np.random.default_rng([seed, 7])
        um = 1.0 / mpp  # pixels per micron
        self.nuclei_shape = []
        self.nuclei_chromatin = []
        for _ in range(48):
            r = rng.uniform(3.2, 4.6) * um
            d = fields.disc(r, soft=1.0, aspect=rng.uniform(1.0, 1.3), angle=rng.uniform(0, np.pi))
            speck = rng.random(d.shape).astype(np.float32)
            # chromatin: coarse clumps + a nucleolus, drawn in H&E only
            clumps = gaussian_filter(speck, 0.8 * um / 2)
            clumps = (clumps - clumps.min()) / max(float(np.ptp(clumps)), 1e-6)
            chrom = d * (0.55 + 0.75 * clumps ** 1.5)
            ny, nx = (np.array(d.shape) // 2 + rng.integers(-int(r / 3) - 1, int(r / 3) + 1, 2))
            chrom[max(ny - 1, 0) : ny + 2, max(nx - 1, 0) : nx + 2] += 0.6 * d[max(ny - 1, 0) : ny + 2, max(nx - 1, 0) : nx + 2]
            self.nuclei_shape.append(d)
            self.nuclei_chromatin.append(chrom.astype(np.float32))
        self.lymph = [fields.disc(rng.uniform(2.2, 2.8) * um, soft=0.8) for _ in range(8)]
        self.rbc = [fields.disc(rng.uniform(2.8, 3.6) * um, soft=1.0, aspect=rng.uniform(1.0, 1.4), angle=rng.uniform(0, np.pi)) for _ in range(8)]
        self.fat = {}
        self.um = um

    def droplet(self, radius_px: float) -> np.ndarray:
        key = int(round(radius_px))
        if key not in self.fat:
            self.fat[key] = fields.disc(float(key), soft=1.2)
        return self.fat[key]


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
        self.sprites = _Sprites(spec.mpp, spec.seed)
        self.noise = noise or _shared_noise()
        spectra = emission_spectra(spec.channels) * np.float32(2400.0 * spec.gain)
        # last row: dark offset 180 counts (+0.5 so the cast to uint16 rounds)
        self._spectra_offset = np.vstack([spectra, np.full((1, spec.channels), 180.5, np.float32)])
        t = spec.stain_tilt
        self.h_od = (HEMATOXYLIN_OD + np.array([t, -t, t], np.float32)) * np.float32(spec.h_strength * np.log(10))
        self.e_od = (EOSIN_OD + np.array([-t / 2, t / 2, 0], np.float32)) * np.float32(spec.e_strength * np.log(10))

    # -- fields -------------------------------------------------------------
    def _tissue(self, y0: int, rows: int) -> np.ndarray:
        s, um = self.spec, self.sprites.um
        w = s.width
        base = fields.fbm(y0, rows, w, 900 * um, s.seed * 31 + 1, octaves=3)
        # an envelope keeps glass around the section
        yy = (y0 + np.arange(rows, dtype=np.float32))[:, None] / s.height * 2 - 1
        xx = np.arange(w, dtype=np.float32)[None, :] / w * 2 - 1
        env = 1.0 - (np.abs(xx) ** 4 + np.abs(yy) ** 4) * 0.9
        field_ = base * 0.9 + env * 0.55
        tissue = np.clip((field_ - 0.62) * 12.0, 0.0, 1.0)
        holes = fields.value_noise(y0, rows, w, 140 * um, s.seed * 31 + 2)
        tissue *= np.clip((0.86 - holes) * 25.0, 0.0, 1.0)
        return tissue

    def render(self, y0: int, rows: int) -> Strip:
        """Render rows ``y0 .. y0+rows`` of the slide."""
        s, sp, um = self.spec, self.sprites, self.sprites.um
        w = s.width
        tissue = self._tissue(y0, rows)

        # sinusoids: thin ridges of a medium-scale noise field -> cords between them
        ridge = np.abs(fields.value_noise(y0, rows, w, 28 * um, s.seed * 31 + 3) - 0.5)
        sinus = np.clip((0.055 - ridge) * 40.0, 0.0, 1.0)
        # collagen: thin ridges at a large scale, fuzzy, plus fine fibres
        cridge = np.abs(fields.value_noise(y0, rows, w, 260 * um, s.seed * 31 + 4) - 0.5)
        collagen = np.clip((0.03 - cridge) * 60.0, 0.0, 1.0)

        nuc_shape = np.zeros((rows, w), np.float32)
        nuc_chrom = np.zeros((rows, w), np.float32)
        fat = np.zeros((rows, w), np.float32)
        rbc = np.zeros((rows, w), np.float32)
        y1 = y0 + rows

        # fat droplets: one candidate per 55 um cell, present with a label-driven probability
        p_fat = FAT_CELL_PROBABILITY[min(max(s.label, 0), 3)]
        fy, fx, fu, fv = fields.jittered_points(y0, y1, w, 55 * um, s.seed * 31 + 5, 26 * um)
        for cy, cx, u, v in zip(fy, fx, fu, fv):
            if u < p_fat:
                sprite = sp.droplet((7 + (14 + 2 * s.label) * v) * um)
                fields.stamp(fat, y0, sprite, cy, cx)
        # microvesicular fat: small droplets (1-3 um) in hepatocytes, denser with the grade
        my, mx, mu, mv = fields.jittered_points(y0, y1, w, 9 * um, s.seed * 31 + 10, 4 * um)
        p_micro = MICRO_FAT_PROBABILITY[min(max(s.label, 0), 3)]
        for cy, cx, u, v in zip(my, mx, mu, mv):
            if u < p_micro:
                fields.stamp(fat, y0, sp.droplet((1.2 + 1.8 * v) * um), cy, cx)
        # hepatocyte nuclei: one per ~24 um cell (some binucleate)
        ny_, nx_, nu, nv = fields.jittered_points(y0, y1, w, 24 * um, s.seed * 31 + 6, 6 * um)
        k = len(sp.nuclei_shape)
        for cy, cx, u, v in zip(ny_, nx_, nu, nv):
            i = int(u * k) % k
            fields.stamp(nuc_shape, y0, sp.nuclei_shape[i], cy, cx)
            fields.stamp(nuc_chrom, y0, sp.nuclei_chromatin[i], cy, cx)
            if v < 0.12:
                j = (i + 7) % k
                fields.stamp(nuc_shape, y0, sp.nuclei_shape[j], cy + 9 * um * (v - 0.06) * 10, cx + 8 * um)
                fields.stamp(nuc_chrom, y0, sp.nuclei_chromatin[j], cy + 9 * um * (v - 0.06) * 10, cx + 8 * um)
        # small dense inflammatory / Kupffer nuclei and red cells (in sinusoids)
        ly, lx, lu, lv = fields.jittered_points(y0, y1, w, 18 * um, s.seed * 31 + 7, 4 * um)
        for cy, cx, u, v in zip(ly, lx, lu, lv):
            if u < 0.12:
                spr = sp.lymph[int(v * 8) % 8]
                fields.stamp(nuc_shape, y0, spr, cy, cx)
                fields.stamp(nuc_chrom, y0, spr * 1.5, cy, cx)
            elif u > 0.55:
                fields.stamp(rbc, y0, sp.rbc[int(v * 8) % 8], cy, cx)

        # composition
        parenchyma = tissue * (1.0 - fat)
        nucleus = nuc_shape * parenchyma * (1.0 - collagen * 0.7)
        sinus_t = sinus * parenchyma * (1.0 - nucleus)
        coll_t = collagen * tissue
        cyto = parenchyma * (1.0 - sinus) * (1.0 - nucleus) * (1.0 - collagen)
        fat_t = fat * tissue
        rbc_t = rbc * sinus_t
        glass = 1.0 - tissue

        af = self._render_af(y0, rows, [cyto, nucleus, coll_t, fat_t, sinus_t, glass])
        he = self._render_he(y0, rows, cyto, nuc_chrom * parenchyma, coll_t, sinus_t, rbc_t, fat_t, tissue)
        return Strip(af, he, tissue)

    def _render_af(self, y0: int, rows: int, parts: list[np.ndarray]) -> np.ndarray:
        """AF counts: abundances @ spectra + dark offset, with shot + read noise (uint16).

        Photon shot noise has variance equal to the signal (gain 1 count per
        photo-electron); read noise (sd 6 counts) is folded into the offset term
        of the variance. Worked in cache-sized chunks: one pass over memory.
        """
        s = self.spec
        n = rows * s.width
        c = s.channels
        abund = np.empty((n, len(parts) + 1), np.float32)
        for k, p in enumerate(parts):
            abund[:, k] = p.ravel()
        abund[:, -1] = 1.0  # the constant (dark offset) component
        out = np.empty((n, c), np.uint16)
        w = s.width
        sig = np.empty((w, c), np.float32)
        sd = np.empty((w, c), np.float32)
        for r in range(rows):  # one row at a time: cache-sized, and noise keyed by row
            i = r * w
            np.matmul(abund[i : i + w], self._spectra_offset, out=sig)
            np.sqrt(sig, out=sd)  # ~ sqrt(signal + read^2): the offset carries read variance
            sd *= self.noise.draw(w * c, (s.seed, y0 + r, 11)).reshape(w, c)
            sig += sd
            # signal >= offset (180) and <= ~9000 with >5 sd headroom: no clipping needed
            np.copyto(out[i : i + w], sig, casting="unsafe")
        return out.reshape(rows, s.width, c)

    def _render_he(
        self, y0: int, rows: int, cyto: np.ndarray, chrom: np.ndarray, coll: np.ndarray,
        sinus: np.ndarray, rbc: np.ndarray, fat: np.ndarray, tissue: np.ndarray,
    ) -> np.ndarray:
        """Beer-Lambert: RGB = 255 * exp(-(H * h_od + E * e_od + background))."""
        s = self.spec
        w = s.width
        um = self.sprites.um
        # H&E-only texture: cytoplasm granularity and stain unevenness, not in the AF
        grain = fields.value_noise(y0, rows, w, 1.6 * um, s.seed * 31 + 8)
        uneven = fields.value_noise(y0, rows, w, 120 * um, s.seed * 31 + 9)
        solid = tissue - fat  # fat droplets are empty (lipid dissolves in processing)
        rim = np.clip(fat * (1.0 - fat) * 4.0, 0.0, 1.0) * tissue
        hema = 0.95 * chrom + 0.025 * cyto + 0.10 * coll + 0.015 * solid
        eosin = (cyto * (0.30 + 0.28 * grain) + 0.70 * coll + 0.08 * sinus + 0.85 * rbc + 0.25 * rim) * (0.8 + 0.4 * uneven)
        od = hema[..., None] * self.h_od + eosin[..., None] * self.e_od
        od += np.float32(0.02)
        cam = np.stack([self.noise.draw(w * 3, (s.seed, y0 + r, 12)) for r in range(rows)]).reshape(rows, w, 3)
        rgb = np.exp(-od) * np.float32(250.0) + cam * np.float32(2.0)
        np.clip(rgb, 0, 255, out=rgb)
        return (rgb + np.float32(0.5)).astype(np.uint8)


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
    meta = {"phantom": asdict(spec), "components": list(COMPONENTS)}

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
    if csv_path.exists() and not force:
        raise OutputExistsError("phantom data exists here; pass --force to make it again", csv_path)
    ensure_writable_dir(out)
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
                   "af_compression": af_compression})
    write_json(out / "synth.json", prov)
    return csv_path


def megapixels(size: tuple[int, int], slides: int) -> float:
    """Slide area in megapixels (for speed reports)."""
    return slides * size[0] * size[1] / 1e6

