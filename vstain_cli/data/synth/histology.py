"""Tissue layout of the phantom liver: which structure is where, strip by strip.

Liver microanatomy as drawn here (sizes in um; e.g. Kumar, Abbas & Aster,
*Robbins Basic Pathology*, ch. 18; Kleiner et al. 2005 for the NASH scoring):

- lobules ~400 um across around a **central vein** (lumen 15-30 um, thin
  collagen wall, flat endothelium); **portal tracts** at the lobule corners:
  collagen with a portal vein, a muscular hepatic artery and a bile duct of
  cuboidal cells, and some lymphocytes;
- **hepatocytes**: polygonal cells ~24 um (Voronoi cells of a jittered lattice),
  in plates one cell thick radiating from the central vein, separated by
  **sinusoids** 4-8 um wide lined by flat endothelial and plump Kupffer nuclei,
  with red cells; round central nuclei 7-10 um with chromatin and a nucleolus,
  ~10 % binucleate;
- **steatosis**: the share of hepatocytes holding fat is the grade's (Kleiner:
  grade 0 < 5 %, 1: 5-33 %, 2: 34-66 %, 3: > 66 %), zone 3 (pericentral)
  predominant; most fatty cells are macrovesicular (one droplet that pushes the
  flattened nucleus to the membrane), the rest microvesicular (foamy cytoplasm
  of small vacuoles, central nucleus);
- NASH with the grade: **ballooned** hepatocytes (pale rarefied cytoplasm),
  lobular inflammatory foci, zone-3 **perisinusoidal collagen**; lipofuscin
  granules in zone-3 hepatocytes.

Every map is a pure function of absolute pixel coordinates and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vstain_cli.data.synth import fields

# Share of hepatocytes with fat drawn per slide for grades 0..3, inside Kleiner's steatosis bands
# (<5 %, 5-33 %, 34-66 %, >66 %).
FAT_SHARE = ((0.0, 0.04), (0.07, 0.31), (0.37, 0.63), (0.70, 0.92))
LOBULE_UM = 420.0
HEPATOCYTE_UM = 24.0


@dataclass(frozen=True)
class Params:
    """Per-slide histology: steatosis grade and the NASH features that go with it."""

    label: int
    fat_share: float
    micro_fraction: float
    balloon_share: float
    inflammation: float
    fibrosis: float

    @classmethod
    def for_grade(cls, label: int, rng: np.random.Generator) -> "Params":
        g = min(max(int(label), 0), 3)
        lo, hi = FAT_SHARE[g]
        return cls(
            label=g,
            fat_share=float(rng.uniform(lo, hi)),
            micro_fraction=float(rng.uniform(0.1, 0.3)),
            balloon_share=float((0.0, 0.015, 0.04, 0.07)[g] * rng.uniform(0.6, 1.4)),
            inflammation=float(0.04 + 0.08 * g * rng.uniform(0.7, 1.3)),
            fibrosis=float((0.0, 0.05, 0.2, 0.4)[g] * rng.uniform(0.6, 1.4)),
        )


MAPS = ("tissue", "cyto", "balloon", "nucleus", "chromatin", "lymph", "fat", "lumen", "rbc", "collagen",
        "elastin", "muscle", "duct", "lipofuscin", "membrane", "grain")


def _ellipse(dy: np.ndarray, dx: np.ndarray, ay: np.ndarray, ax: np.ndarray, ra, rb) -> tuple[np.ndarray, np.ndarray]:
    """Soft inside (px) of an ellipse with half-axes ra along unit (ay, ax) and rb across; and q = radius ratio."""
    u = dy * ay + dx * ax
    v = dx * ay - dy * ax
    q = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
    return fields.soft_inside((1.0 - q) * np.minimum(ra, rb)), q


def _ring_slots(r: np.ndarray, ang: np.ndarray, r0: float, n: int, half_t: float, half_r: float) -> np.ndarray:
    """Soft nuclei on a ring: n slots at radius r0, half-lengths along (half_t) and across (half_r) the ring."""
    step = 2 * np.pi / n
    da = ang - np.round(ang / step) * step
    q = np.sqrt((r * da / half_t) ** 2 + ((r - r0) / half_r) ** 2)
    return fields.soft_inside((1.0 - q) * min(half_t, half_r))


def tissue_mask(y0: int, rows: int, width: int, height: int, um: float, seed: int) -> np.ndarray:
    """A section with irregular borders (fractal noise in an envelope) and a few tears, on glass."""
    base = fields.fbm(y0, rows, width, 900 * um, seed * 31 + 1, octaves=3)
    yy = (y0 + np.arange(rows, dtype=np.float32))[:, None] / height * 2 - 1
    xx = np.arange(width, dtype=np.float32)[None, :] / width * 2 - 1
    env = 1.0 - (np.abs(xx) ** 4 + np.abs(yy) ** 4) * 0.9
    tissue = np.clip((base * 0.9 + env * 0.55 - 0.62) * 12.0, 0.0, 1.0)
    holes = fields.value_noise(y0, rows, width, 140 * um, seed * 31 + 2)
    return tissue * np.clip((0.88 - holes) * 25.0, 0.0, 1.0)


def layout(p: Params, seed: int, mpp: float, height: int, width: int, y0: int, rows: int) -> dict[str, np.ndarray]:
    """Component maps (rows, width), float32 in [0, 1], for rows ``y0 .. y0+rows``; keys ``MAPS``
    plus ``cell_id`` (hepatocyte id of each pixel) and ``cell_fat`` (0 none, 1 macro, 2 micro)."""
    um = np.float32(1.0 / mpp)  # pixels per micron
    w = width
    Y = (y0 + np.arange(rows, dtype=np.float32))[:, None]
    X = np.arange(w, dtype=np.float32)[None, :]
    s = seed * 31
    tissue = tissue_mask(y0, rows, w, height, um, seed)

    # -- lobules: central veins and portal tracts (coarse lattices, interleaved) ------------
    dcv, cvy, cvx, cu0, _, _, _ = fields.nearest_coarse(y0, rows, w, LOBULE_UM * um, s + 11, jitter=(0.3, 0.7))
    dpt, pty, ptx, pu0, pu1, pu2, pu3 = fields.nearest_coarse(y0, rows, w, LOBULE_UM * um, s + 12,
                                                              jitter=(0.3, 0.7), offset=0.5)
    zone = dcv / np.maximum(dcv + dpt, 1.0)  # 0 at the central vein (zone 3) .. 1 at the portal tract (zone 1)
    wobble = fields.value_noise(y0, rows, w, 25 * um, s + 13) - 0.5
    r_cv = (14 + 14 * cu0) * um
    cv_lumen = fields.soft_inside(r_cv * (1 + 0.25 * wobble) - dcv)
    cv_wall = fields.soft_inside(r_cv * (1 + 0.25 * wobble) + 3 * um - dcv) - cv_lumen
    r_pt = (42 + 30 * pu0) * um
    pt = fields.soft_inside(r_pt * (1 + 0.5 * wobble) - dpt)

    # portal structures at fixed polar offsets from the tract centre
    a0 = pu1 * np.float32(2 * np.pi)
    def at(frac: float, turn: float, angle: bool = True):  # noqa: E306
        cy = pty + np.sin(a0 + turn) * r_pt * frac
        cx = ptx + np.cos(a0 + turn) * r_pt * frac
        dy, dx = Y - cy, X - cx
        return np.hypot(dy, dx), (np.arctan2(dy, dx) if angle else None)
    rv, _ = at(0.3, 0.0, angle=False)
    pv_r = r_pt * (0.22 + 0.12 * pu2)
    pv_lumen = fields.soft_inside(pv_r - rv) * pt
    pv_wall = (fields.soft_inside(pv_r + 1.5 * um - rv) * pt - pv_lumen)
    ra, aa = at(0.55, 2.3)
    art_lumen = fields.soft_inside(3 * um - ra) * pt
    art_wall = fields.soft_inside(8 * um - ra) * pt - art_lumen
    art_lamina = fields.soft_inside(1.0 * um - np.abs(ra - 3.8 * um)) * pt
    art_nuc = _ring_slots(ra, aa, 6.0 * um, 7, 3.0 * um, 1.0 * um) * art_wall
    rd, ad = at(0.55, 4.2)
    duct_lumen = fields.soft_inside(3.5 * um - rd) * pt
    duct_epi = fields.soft_inside(10 * um - rd) * pt - duct_lumen
    duct_nuc = _ring_slots(rd, ad, 7.5 * um, 9, 1.8 * um, 1.7 * um) * duct_epi
    structures = np.clip(pv_lumen + pv_wall + art_wall + art_lumen + duct_epi + duct_lumen, 0, 1)
    fib = fields.value_noise(y0, rows, w, 6 * um, s + 14)
    fibres = np.clip((0.16 - np.abs(fib - 0.5)) * 8.0, 0.0, 1.0)  # wavy collagen bundles
    pt_stroma = pt * (1 - structures)
    pt_collagen = pt_stroma * (0.7 + 0.3 * fibres)

    # -- hepatocytes and sinusoids -------------------------------------------------------------
    hep = fields.Worley(Y, X, HEPATOCYTE_UM * um, s + 20, jitter=(0.15, 0.85))
    u = {k: hep.lattice_unit(k) for k in range(8)}
    # a cell edge is a sinusoid mostly when it runs radially (plates radiate from the central vein)
    ry, rx = Y - cvy, X - cvx
    rn = np.maximum(np.hypot(ry, rx), 1.0)
    sy, sx = hep.p2y - hep.p1y, hep.p2x - hep.p1x
    sep = np.maximum(np.hypot(sy, sx), 1e-3)
    radial_centres = np.abs(sy * ry + sx * rx) / (sep * rn)  # 1: neighbours stacked along the radius, same plate
    p_sin = 0.12 + 0.78 * np.clip((0.8 - radial_centres) / 0.5, 0.0, 1.0)
    pu_a, pu_b, pu_c, pu_d, pu_e = hep.pair_units(5)
    is_sin = pu_a < p_sin
    d_edge = hep.edge_distance()
    hw = (2.0 + 1.8 * pu_b) * um
    sinus = fields.soft_inside(hw - d_edge) * is_sin
    membrane = fields.soft_inside(0.6 * um - d_edge) * (1 - is_sin)
    # endothelial (flat) and Kupffer (plump) nuclei along sinusoid edges, centred near the edge midpoint
    my, mx = (hep.p1y + hep.p2y) * 0.5, (hep.p1x + hep.p2x) * 0.5
    ny_, nx_ = sy / sep, sx / sep
    sign = np.where(np.minimum(hep.id1, hep.id2) == hep.id1, 1.0, -1.0).astype(np.float32)  # pair-consistent normal
    ny_, nx_ = ny_ * sign, nx_ * sign
    side = np.where(pu_c < 0.5, 1.0, -1.0).astype(np.float32)
    off = (hw - 0.7 * um) * side
    endo, _ = _ellipse(Y - (my + ny_ * off), X - (mx + nx_ * off), -nx_, ny_, 4.5 * um, 1.0 * um)
    kupffer, _ = _ellipse(Y - my, X - mx, -nx_, ny_, 3.0 * um, 2.0 * um)
    lining = is_sin * (endo * (pu_d < 0.45) + kupffer * (pu_d > 0.9))

    # per-cell fat state (Kleiner grade = share of hepatocytes with fat), zone 3 predominant
    zone_w = 1.35 - 0.7 * zone
    def fat_state(ui: np.ndarray) -> np.ndarray:  # noqa: E306
        thr = np.minimum(p.fat_share * zone_w, 0.98)
        macro = ui < thr * (1 - p.micro_fraction)
        micro = ~macro & (ui < thr)
        return np.where(macro, 1, np.where(micro, 2, 0)).astype(np.uint8)
    fat1 = fat_state(u[0][hep.i1])
    fat2 = fat_state(u[0][hep.i2])
    half = np.float32(HEPATOCYTE_UM * um / 2)
    def droplet(i: np.ndarray, state: np.ndarray, py, px):  # noqa: E306
        ang = u[1][i] * np.float32(2 * np.pi)
        rf = half * (0.62 + 0.3 * u[2][i]) * (0.9 + 0.07 * p.label)
        cy = py - np.sin(ang) * 0.15 * half
        cx = px - np.cos(ang) * 0.15 * half
        return fields.soft_inside(rf - np.hypot(Y - cy, X - cx)) * (state == 1), ang, rf, cy, cx
    drop1, ang1, rf1, fcy, fcx = droplet(hep.i1, fat1, hep.p1y, hep.p1x)
    drop2, _, _, _, _ = droplet(hep.i2, fat2, hep.p2y, hep.p2x)
    macro = np.maximum(drop1, drop2)
    vac = fields.value_noise(y0, rows, w, 1.3 * um, s + 21)
    micro = np.clip((vac - 0.6) * 12.0, 0.0, 1.0) * (fat1 == 2)

    # hepatocyte nuclei: central, pushed aside and flattened by a macrovesicular droplet, some binucleate
    rn_ = (3.6 + 1.3 * u[3][hep.i1]) * um
    nang = u[4][hep.i1] * np.float32(2 * np.pi)
    binuc = (u[5][hep.i1] < 0.1) & (fat1 != 1)
    pushed = fat1 == 1
    dist = np.where(pushed, rf1 + 0.45 * rn_, np.where(binuc, 1.15 * rn_, 0.12 * rn_))
    base_y = np.where(pushed, fcy, hep.p1y)
    base_x = np.where(pushed, fcx, hep.p1x)
    c1y, c1x = base_y + np.sin(nang) * dist, base_x + np.cos(nang) * dist
    ra_ = np.where(pushed, 0.5 * rn_, rn_)
    rb_ = np.where(pushed, 1.2 * rn_, rn_ * (0.85 + 0.15 * u[6][hep.i1]))
    nwob = 1.0 + 0.12 * (fields.value_noise(y0, rows, w, 2.5 * um, s + 22) - 0.5)
    n1, q1 = _ellipse((Y - c1y) * nwob, (X - c1x) * nwob, np.sin(nang), np.cos(nang), ra_, rb_)
    n2, q2 = _ellipse(Y - (hep.p1y - np.sin(nang) * dist), X - (hep.p1x - np.cos(nang) * dist),
                      np.sin(nang), np.cos(nang), rn_, rn_ * 0.9)
    n2 = n2 * binuc
    hep_nuc = np.maximum(n1, n2)
    q = np.where(n2 > n1, q2, q1)
    # nucleolus: a ~1.4 um dark dot off-centre in most nuclei
    nol_y, nol_x = c1y + np.sin(nang + 2.0) * 0.35 * rn_, c1x + np.cos(nang + 2.0) * 0.35 * rn_
    nucleolus = fields.soft_inside(0.75 * um - np.hypot(Y - nol_y, X - nol_x)) * (u[7][hep.i1] < 0.8) * n1

    # -- lymphocytes and fibroblasts: sparse, from jittered points -----------------------------
    lymph = np.zeros((rows, w), np.float32)
    _lymphocytes(lymph, p, y0, rows, w, um, s)

    # -- composition ----------------------------------------------------------------------------
    vessel = np.clip(cv_lumen + cv_wall + pt, 0.0, 1.0)
    paren = tissue * (1.0 - vessel)
    fat = np.clip(macro + micro * (1.0 - hep_nuc), 0.0, 1.0) * paren
    sin_t = sinus * paren * (1.0 - fat)
    nucleus_hep = hep_nuc * paren * (1.0 - sin_t) * (1.0 - macro)
    lining_t = np.clip(lining, 0.0, 1.0) * sin_t
    zone3 = np.clip((0.45 - zone) / 0.3, 0.0, 1.0)
    peri = fields.soft_inside(1.2 * um - np.abs(d_edge - hw)) * is_sin * (pu_e < p.fibrosis) * zone3
    cell = paren * (1.0 - sin_t) * (1.0 - fat) * (1.0 - nucleus_hep)
    balloon = (u[6][hep.i1] < p.balloon_share / 0.9) * (fat1 == 0) * cell * (zone < 0.6)
    lf_noise = fields.value_noise(y0, rows, w, 0.9 * um, s + 23)
    lipofuscin = np.clip((lf_noise - 0.78) * 10.0, 0.0, 1.0) * zone3 * cell * (1.0 - balloon)
    # red cells in sinusoids and vessel lumens: ~7 um blobs
    rb = fields.value_noise(y0, rows, w, 3.5 * um, s + 24)
    lumen_all = np.clip(sin_t * (1 - lining_t) + (cv_lumen + pv_lumen + art_lumen) * tissue, 0.0, 1.0)
    big_lumen = np.clip((cv_lumen + pv_lumen) * tissue, 0.0, 1.0)
    rbc = np.clip((rb - 0.66) * 9.0, 0.0, 1.0) * sin_t * (1 - lining_t) + np.clip((rb - 0.8) * 9.0, 0.0, 1.0) * big_lumen
    collagen = np.clip(pt_collagen + cv_wall + pv_wall * 0.8 + peri * paren * 0.8, 0.0, 1.0) * tissue
    nucleus = np.clip(nucleus_hep + lining_t + (art_nuc + duct_nuc) * tissue, 0.0, 1.0)
    lymph = lymph * tissue * (1.0 - fat) * (1.0 - lumen_all * 0.7)
    nucleus = np.maximum(nucleus, lymph)
    chrom_noise = fields.value_noise(y0, rows, w, 0.75 * um, s + 25)
    rim = np.clip((q - 0.78) * 6.0, 0.0, 1.0)
    chromatin = np.clip(0.45 * (chrom_noise - 0.5) * 2 + 0.45 * rim + 1.2 * nucleolus, -0.4, 1.6)
    grain = fields.value_noise(y0, rows, w, 1.0 * um, s + 26) * 0.7 + fields.value_noise(y0, rows, w, 3 * um, s + 27) * 0.3
    out = {
        "tissue": tissue,
        "cyto": cell * (1.0 - nucleus),
        "balloon": balloon,
        "nucleus": nucleus,
        "chromatin": chromatin * nucleus_hep,
        "lymph": lymph,
        "fat": fat,
        "lumen": lumen_all * (1.0 - rbc),
        "rbc": rbc,
        "collagen": collagen * (1.0 - nucleus),
        "elastin": art_lamina * tissue + cv_wall * 0.3 * tissue,
        "muscle": art_wall * (1.0 - art_nuc) * tissue,
        "duct": duct_epi * (1.0 - duct_nuc) * tissue,
        "lipofuscin": lipofuscin,
        "membrane": membrane * cell,
        "grain": grain,
        "cell_id": hep.id1,
        "cell_fat": fat1 * (paren > 0.5),
    }
    return {k: (v.astype(np.float32) if k not in ("cell_id", "cell_fat") else v) for k, v in out.items()}


def _lymphocytes(canvas: np.ndarray, p: Params, y0: int, rows: int, w: int, um: float, s: int) -> None:
    """Dense round lymphocyte nuclei (~5.5 um) in portal tracts and lobular foci, by stamping."""
    cell = 7.0 * um
    py, px, pu, pv = fields.jittered_points(y0, y0 + rows, w, cell, s + 30, 4 * um)
    if len(py) == 0:
        return
    dpt = fields.Worley(py, px, LOBULE_UM * um, s + 12, jitter=(0.3, 0.7), offset=0.5)
    foci = fields.Worley(py, px, 90 * um, s + 31)
    r_pt = (42 + 30 * dpt.lattice_unit(0)[dpt.i1]) * um
    in_pt = dpt.d1 < r_pt * 0.9
    focus = (foci.d1 < 14 * um) & (foci.lattice_unit(0)[foci.i1] < p.inflammation * 2.5)
    density = np.where(in_pt, 0.10 + p.inflammation, 0.0) + np.where(focus, 0.7, 0.0)
    keep = pu < density
    sprites = [fields.disc(float(r) * um, soft=1.0) for r in (2.4, 2.7, 3.0)]
    for cy, cx, v in zip(py[keep], px[keep], pv[keep]):
        fields.stamp(canvas, y0, sprites[int(v * 3) % 3], cy, cx)
