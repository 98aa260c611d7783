"""Estimating the AF -> H&E registration of a slide pair, and measuring residual misalignment.

The two images compared are the **AF channel sum** and the **H&E eosin optical
density** (colour deconvolution, Ruifrok & Johnston 2001). Both are high in
cytoplasm and connective tissue and low in nuclei, lumens, fat and glass, so
they correlate positively at every scale; total H&E optical density would add
hematoxylin, which is bright exactly where AF is dark (nuclei).

1. Rigid: on ~8 µm/px thumbnails, the H&E view is rotated over a range of
   angles and each rotation is translated by phase correlation; the angle with
   the best normalised cross-correlation wins (refined to 0.25°).
2. Affine: on ~2 µm/px thumbnails, local shifts of tissue blocks (phase
   correlation through the current transform) give point correspondences; a
   robust least-squares affine fit to them, twice.
3. Residual grid: at full resolution, per tissue block (default 128 µm), the
   AF block and the H&E read through the affine are phase-correlated with
   sub-pixel upsampling; the shift, its confidence (normalised cross-correlation
   after the shift) and a validity flag are kept per grid node; rejected nodes
   are filled from their neighbours (normalised convolution).
4. Quality bar (``quality``): enough matched tissue blocks, a converged second
   pass and a plausible affine, or the registration is marked failed.

Phase correlation: Kuglin & Hines 1975; sub-pixel refinement by upsampled
matrix-multiply DFT, Guizar-Sicairos, Thurman & Fienup 2008
(skimage.registration.phase_cross_correlation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import hed_from_rgb
from skimage.registration import phase_cross_correlation

from vstain_cli.data.warp import GLASS_RGB, Transform, read_at, read_registered, warp_view
from vstain_cli.io.grid import tissue_mask_af
from vstain_cli.progress import NullProgress, Progress

FORMAT = "vstain-registration"
FORMAT_VERSION = 2  # 2: records carry ``quality`` (a failed one is never used)


@dataclass
class RegisterOptions:
    """Settings of ``vstain register``."""

    max_rotation: float = 10.0  # degrees searched either way
    coarse_um: float = 8.0  # µm per pixel of the rigid-search thumbnails
    affine_um: float = 2.0  # µm per pixel of the affine-refinement thumbnails
    block_um: float = 128.0  # side of a full-resolution block
    step_um: float = 64.0  # grid spacing of the residual shifts (blocks overlap)
    min_confidence: float = 0.3  # blocks whose correlation after the shift is lower are rejected
    min_tissue: float = 0.3  # blocks with less AF tissue are not measured
    # the quality bar (see ``quality``): below it a pair's registration is failed, never used
    min_blocks: int = 10  # matched tissue blocks, at least
    min_matched: float = 0.25  # matched / measured tissue blocks, at least
    max_residual_um: float = 1.5  # median shift the second pass still measures at matched blocks, at most
    max_scale_change: float = 0.15  # each axis of the affine within 1 +- this of the pixel-size ratio

    def check(self) -> None:
        if not 0 <= self.max_rotation <= 45:
            raise ValueError("--max-rotation must be between 0 and 45 degrees")
        if min(self.coarse_um, self.affine_um, self.block_um, self.step_um) <= 0:
            raise ValueError("registration scales must be positive")
        if self.min_blocks < 3:
            raise ValueError("--min-blocks must be at least 3 (an affine needs 3 points)")
        if not 0 <= self.min_matched <= 1:
            raise ValueError("--min-matched must be between 0 and 1")
        if self.max_residual_um <= 0:
            raise ValueError("--max-residual must be positive")
        if not 0 < self.max_scale_change < 1:
            raise ValueError("--max-scale-change must be between 0 and 1")


@dataclass
class Registration:
    """An estimated registration: the transform and what each residual block measured."""

    transform: Transform
    confidence: np.ndarray  # (ny, nx) NCC after the shift, 0 where not measured
    valid: np.ndarray  # (ny, nx) bool: measured and accepted
    mpp: float
    stats: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # see ``quality``

    @property
    def passed(self) -> bool:
        return bool(self.quality.get("passed", False))


# ----------------------------------------------------------------------------- views


def af_view(af: np.ndarray) -> np.ndarray:
    """AF (h, w, C) -> channel sum (h, w) float32."""
    return af.astype(np.float32).sum(axis=2) if af.ndim == 3 else af.astype(np.float32)


def he_view(rgb: np.ndarray) -> np.ndarray:
    """H&E RGB (h, w, 3) -> eosin optical density (h, w) float32 (Ruifrok & Johnston 2001)."""
    od = -np.log10(np.clip(rgb[..., :3].astype(np.float32), 1.0, 255.0) / 255.0)
    return (od @ hed_from_rgb.astype(np.float32))[..., 1]


def _normalise(img: np.ndarray) -> np.ndarray:
    """Glass to 0, tissue to ~1: subtract the 5th percentile, divide by the 99th - 5th."""
    lo, hi = np.percentile(img, [5, 99])
    return ((img - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson r) of two equal-shape images."""
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def shift_of(ref: np.ndarray, mov: np.ndarray, upsample: int = 10) -> tuple[np.ndarray, float]:
    """(dy, dx) with ``ref(p) ~ mov(p - shift)`` and the NCC of the overlap after the shift.

    Both are mean-subtracted and Hann-windowed, then cross-correlated by FFT
    with sub-pixel peak refinement (skimage ``phase_cross_correlation``:
    Kuglin & Hines 1975; Guizar-Sicairos et al. 2008) *without* the
    phase normalisation: whitening the spectrum amplifies the noise and
    modality-specific texture of an AF / H&E pair (on phantom patches offset by
    5 µm the plain correlation finds 13 of 16 shifts, the phase-normalised one 10).
    """
    h, w = ref.shape
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    r = (ref - ref.mean()) * win
    m = (mov - mov.mean()) * win
    if not (np.any(r) and np.any(m)):
        return np.zeros(2), 0.0
    shift, _, _ = phase_cross_correlation(r, m, upsample_factor=upsample, normalization=None)
    dy, dx = int(round(shift[0])), int(round(shift[1]))
    ys = slice(max(dy, 0), h + min(dy, 0))
    xs = slice(max(dx, 0), w + min(dx, 0))
    ym = slice(max(-dy, 0), h + min(-dy, 0))
    xm = slice(max(-dx, 0), w + min(-dx, 0))
    a, b = ref[ys, xs], mov[ym, xm]
    conf = ncc(a, b) if a.size > 16 else 0.0
    return np.asarray(shift, np.float64), conf


# ----------------------------------------------------------------------------- transforms


def _rigid(angle_deg: float, scale: float, shift: tuple[float, float], c_af: np.ndarray, c_he: np.ndarray) -> np.ndarray:
    """Affine (2x3) rotating by ``angle`` and scaling about the AF centre onto the H&E centre, then shifting."""
    t = np.deg2rad(angle_deg)
    lin = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.column_stack([lin, c_he - lin @ c_af + np.asarray(shift)])


def _shifted(t: Transform, shift_view: np.ndarray) -> Transform:
    """``T(p - s)``: compose with an AF-side shift ``s`` = (dy, dx) in view pixels."""
    a = t.affine.copy()
    a[:, 2] -= a[:, :2] @ np.array([shift_view[1], shift_view[0]])
    return t.with_affine(a)


def rigid_search(af: np.ndarray, he: np.ndarray, max_rotation: float, scale: float = 1.0) -> tuple[Transform, float]:
    """Best rotation + translation of view ``he`` onto view ``af`` (both normalised); (transform, NCC)."""
    c_af = (np.array(af.shape[::-1]) - 1) / 2
    c_he = (np.array(he.shape[::-1]) - 1) / 2

    def score(angle: float) -> tuple[float, Transform]:
        t = Transform(_rigid(angle, scale, (0.0, 0.0), c_af, c_he))
        moved = warp_view(he, t, af.shape, cval=0.0)
        s, _ = shift_of(af, moved, upsample=4)
        t = _shifted(t, s)
        return ncc(af, warp_view(he, t, af.shape, cval=0.0)), t

    angles = np.arange(-np.ceil(max_rotation), np.ceil(max_rotation) + 0.5, 1.0)
    results = [score(a) for a in angles]
    best = int(np.argmax([r[0] for r in results]))
    fine = [score(a) for a in angles[best] + np.arange(-0.75, 0.76, 0.25)]
    k = int(np.argmax([r[0] for r in fine]))
    return fine[k][1], fine[k][0]


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares affine (2x3) with dst ~ A [src, 1]; src, dst (n, 2)."""
    if len(src) < 3:
        raise ValueError("an affine fit needs at least 3 correspondences")
    x = np.column_stack([src, np.ones(len(src))]) * np.sqrt(weights)[:, None]
    y = dst * np.sqrt(weights)[:, None]
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    return sol.T


def robust_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Affine fit with outliers (residual > max(3 MAD, ``floor``)) dropped, repeated twice; (affine, kept)."""
    keep = np.ones(len(src), bool)
    a = fit_affine(src, dst, weights)
    for _ in range(2):
        res = np.linalg.norm(dst - (src @ a[:, :2].T + a[:, 2]), axis=1)
        keep = res <= max(3 * 1.4826 * float(np.median(res)), floor)
        if keep.sum() < 3:
            break
        a = fit_affine(src[keep], dst[keep], weights[keep])
    return a, keep


# ----------------------------------------------------------------------------- estimation


def _views(af_reader, he_reader, um: float, mpp_af: float, mpp_he: float):
    """AF channel-sum and H&E eosin views of about ``um`` µm/px, normalised, and their downsamples."""
    a, ds_a = af_reader.thumbnail(max(16, int(np.ceil(max(af_reader.width, af_reader.height) * mpp_af / um))),
                                  channel_sum=True)
    h, ds_h = he_reader.thumbnail(max(16, int(np.ceil(max(he_reader.width, he_reader.height) * mpp_he / um))))
    return _normalise(a[..., 0]), _normalise(he_view(h)), ds_a, ds_h, a


def _refine_affine(af: np.ndarray, he: np.ndarray, mask: np.ndarray, t: Transform, block: int,
                   floor_px: float) -> tuple[Transform, int]:
    """One round: block shifts of ``he`` through ``t`` against ``af`` -> robust affine (view pixels)."""
    moved = warp_view(he, t, af.shape, cval=0.0)
    src, dst, wts = [], [], []
    half = block // 2
    for cy in range(half, af.shape[0] - half + 1, half):
        for cx in range(half, af.shape[1] - half + 1, half):
            sl = (slice(cy - half, cy + half), slice(cx - half, cx + half))
            if mask[sl].mean() < 0.3:
                continue
            s, conf = shift_of(af[sl], moved[sl], upsample=10)
            if conf < 0.2 or np.abs(s).max() > half / 2:
                continue
            p = np.array([cx - 0.5, cy - 0.5])  # block centre
            src.append(p)
            dst.append(np.array(t.map(p[0] - s[1], p[1] - s[0])))
            wts.append(conf)
    if len(src) < 6:
        return t, len(src)
    a, keep = robust_affine(np.array(src), np.array(dst), np.array(wts), floor_px)
    return Transform(a), int(keep.sum())


def _fill(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Invalid nodes filled from valid ones by normalised convolution (Knutsson & Westin 1993)."""
    if valid.all():
        return values
    if not valid.any():
        return np.zeros_like(values)
    out = values.copy()
    sigma = 1.0
    todo = ~valid
    while todo.any() and sigma <= max(values.shape):
        num = gaussian_filter(np.where(valid, values, 0.0), sigma, mode="nearest")
        den = gaussian_filter(valid.astype(np.float64), sigma, mode="nearest")
        ok = todo & (den > 1e-3)
        out[ok] = num[ok] / den[ok]
        todo &= ~ok
        sigma *= 2
    # a kernel wider than the grid weighs all valid nodes alike: the limit is their mean (a few valid
    # nodes on a large grid never reach the density threshold; growing sigma further only costs memory)
    out[todo] = values[valid].mean()
    return out


def _consistent(dx: np.ndarray, dy: np.ndarray, valid: np.ndarray, far: float, radius: int = 2) -> np.ndarray:
    """``valid`` less the nodes further than ``far`` from the median of their valid neighbours."""
    out = valid.copy()
    ny, nx = valid.shape
    for j, i in zip(*np.nonzero(valid)):
        sl = (slice(max(j - radius, 0), j + radius + 1), slice(max(i - radius, 0), i + radius + 1))
        nb = valid[sl].copy()
        nb[j - sl[0].start, i - sl[1].start] = False
        if nb.sum() < 3:
            continue
        mx, my = np.median(dx[sl][nb]), np.median(dy[sl][nb])
        if np.hypot(dx[j, i] - mx, dy[j, i] - my) > far:
            out[j, i] = False
    return out


def _measure(af_reader, he_reader, t: Transform, xs: np.ndarray, ys: np.ndarray, block: int, af_mask: np.ndarray,
             mask_ds: float, o: RegisterOptions, progress: Progress, key: str):
    """Shift (dy, dx) (AF px), confidence and a measured flag of the block centred on each node, through ``t``."""
    ny, nx = len(ys), len(xs)
    shift = np.zeros((ny, nx, 2))
    conf = np.zeros((ny, nx))
    measured = np.zeros((ny, nx), bool)
    tried = np.zeros((ny, nx), bool)  # tissue blocks whose H&E lies on the slide
    progress.start(key, f"{key}: residual blocks", ny * nx)
    for j, cy in enumerate(ys):
        for i, cx in enumerate(xs):
            progress.advance(key)
            x0, y0 = int(round(cx + 0.5 - block / 2)), int(round(cy + 0.5 - block / 2))
            m = af_mask[max(int(y0 / mask_ds), 0) : int(np.ceil((y0 + block) / mask_ds)),
                        max(int(x0 / mask_ds), 0) : int(np.ceil((x0 + block) / mask_ds))]
            if m.size == 0 or m.mean() < o.min_tissue:
                continue
            a = af_view(af_reader.read_region(x0, y0, block, block))
            yy, xx = np.mgrid[y0 : y0 + block, x0 : x0 + block].astype(np.float64)
            u, v = t.map(xx, yy)
            if not ((u > 0) & (v > 0) & (u < he_reader.width - 1) & (v < he_reader.height - 1)).mean() > 0.75:
                continue  # the block's H&E lies mostly outside the H&E slide
            b = he_view(read_at(he_reader, u, v, cval=GLASS_RGB))
            tried[j, i] = True
            s, c = shift_of(a, b, upsample=20)
            conf[j, i] = max(c, 0.0)
            if c >= o.min_confidence and np.abs(s).max() <= block / 4:
                shift[j, i] = s
                measured[j, i] = True
    progress.finish(key)
    return shift, conf, measured, tried


def residual_grid(af_reader, he_reader, t: Transform, af_mask: np.ndarray, mask_ds: float, mpp: float,
                  o: RegisterOptions, progress: Progress, key: str) -> Registration:
    """Full-resolution residual shifts of tissue blocks on top of the affine ``t`` (level-0 pixels).

    Two passes: through the affine, then through the affine plus the first
    grid (smaller shifts, more accurate correlation peaks).
    """
    block = int(round(o.block_um / mpp / 8)) * 8
    step = float(round(o.step_um / mpp))
    w, h = af_reader.width, af_reader.height
    nx, ny = max(1, int(np.ceil(w / step))), max(1, int(np.ceil(h / step)))
    origin = ((w - (nx - 1) * step) / 2 - 0.5, (h - (ny - 1) * step) / 2 - 0.5)  # grid centred on the slide
    xs, ys = origin[0] + np.arange(nx) * step, origin[1] + np.arange(ny) * step
    lin = t.affine[:, :2]
    dx, dy = np.zeros((ny, nx)), np.zeros((ny, nx))
    current = t
    for _ in range(2):
        s, conf, measured, tried = _measure(af_reader, he_reader, current, xs, ys, block, af_mask, mask_ds, o, progress, key)
        mdx = dx - (lin[0, 0] * s[..., 1] + lin[0, 1] * s[..., 0])  # T(p - s) - T(p) = -J s
        mdy = dy - (lin[1, 0] * s[..., 1] + lin[1, 1] * s[..., 0])
        valid = _consistent(mdx, mdy, measured, far=10.0 / mpp)
        if valid.sum() >= 3:  # the mean shift is an affine correction: fold it in
            mean = np.array([mdx[valid].mean(), mdy[valid].mean()])
            a = t.affine.copy()
            a[:, 2] += mean
            t = Transform(a)
            mdx, mdy = mdx - mean[0], mdy - mean[1]
        dx, dy = _fill(np.where(valid, mdx, 0.0), valid), _fill(np.where(valid, mdy, 0.0), valid)
        current = Transform(t.affine, origin, step, dx, dy)
    shifts = np.sqrt(dx**2 + dy**2)[valid] * mpp
    last = np.hypot(s[..., 0], s[..., 1])[valid] * mpp  # what the second pass still moved (AF px -> µm)
    stats = {"blocks_tissue": int(tried.sum()), "blocks_measured": int(measured.sum()),
             "blocks_valid": int(valid.sum()), "block_px": block,
             "residual_um_median": float(np.median(shifts)) if shifts.size else None,
             "residual_um_max": float(shifts.max()) if shifts.size else None,
             "pass2_shift_um_median": float(np.median(last)) if last.size else None,
             "confidence_median": float(np.median(conf[valid])) if valid.any() else None}
    return Registration(current, np.round(conf, 3), valid, mpp, stats)


def estimate(af_reader, he_reader, mpp_af: float, mpp_he: float, options: RegisterOptions | None = None,
             progress: Progress | None = None, key: str = "register") -> Registration:
    """The AF -> H&E registration of one slide pair (thumbnails plus per-block reads only)."""
    o = options or RegisterOptions()
    o.check()
    progress = progress or NullProgress()
    # 1. rigid on coarse views
    a, h, ds_a, ds_h, _ = _views(af_reader, he_reader, o.coarse_um, mpp_af, mpp_he)
    scale = (mpp_af * ds_a) / (mpp_he * ds_h)
    t_view, rigid_ncc = rigid_search(a, h, o.max_rotation, scale)
    t = _to_level0(t_view, ds_a, ds_h)
    # 2. affine on finer views
    a2, h2, ds_a2, ds_h2, a2_raw = _views(af_reader, he_reader, o.affine_um, mpp_af, mpp_he)
    mask2 = tissue_mask_af(a2_raw, channels=af_reader.channels)
    block2 = max(16, int(round(256 / o.affine_um)) // 2 * 2)  # 256 µm blocks
    kept = 0
    for _ in range(2):
        tv, kept = _refine_affine(a2, h2, mask2, t.scaled(ds_a2, ds_h2), block2, floor_px=30 / o.affine_um)
        t = _to_level0(tv, ds_a2, ds_h2)
    # 3. residual grid at full resolution
    reg = residual_grid(af_reader, he_reader, t, mask2, ds_a2, mpp_af, o, progress, key)
    reg.stats = {"rigid_ncc": round(rigid_ncc, 4), "affine_correspondences": kept, **reg.stats}
    reg.quality = quality(reg, o, mpp_af / mpp_he)
    return reg


def affine_shape(affine: np.ndarray) -> tuple[float, float, float, float]:
    """(rotation in degrees, larger and smaller axis scale, determinant) of a 2x3 affine's linear part.

    The axis scales are the singular values; the rotation is that of the
    closest similarity, atan2(a10 - a01, a00 + a11).
    """
    lin = np.asarray(affine, np.float64)[:, :2]
    s = np.linalg.svd(lin, compute_uv=False)
    angle = float(np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])))
    return angle, float(s[0]), float(s[1]), float(np.linalg.det(lin))


def quality(reg: Registration, o: RegisterOptions, expected_scale: float) -> dict:
    """The quality bar of a registration: its numbers, ``passed`` and the ``reasons`` it failed.

    A registration passes when
    - enough tissue blocks matched: at least ``min_blocks`` and a ``min_matched``
      share of the tissue blocks measured (random matches of unrelated or
      misplaced images are few and isolated);
    - it converged: the median shift the second residual pass still measures at
      matched blocks is at most ``max_residual_um`` (random peaks move by microns);
    - its affine is plausible: no mirror, a rotation within the searched range
      (+1 degree of refinement), each axis scale within 1 +- ``max_scale_change``
      of the pixel-size ratio ``expected_scale`` (H&E px per AF px).
    """
    st = reg.stats
    valid, tissue = int(st.get("blocks_valid", 0)), int(st.get("blocks_tissue", 0))
    matched = valid / tissue if tissue else 0.0
    shift = st.get("pass2_shift_um_median")
    angle, s_max, s_min, det = affine_shape(reg.transform.affine)
    lo, hi = s_min / expected_scale, s_max / expected_scale
    reasons = []
    if valid < o.min_blocks or matched < o.min_matched:
        reasons.append(f"only {valid} of {tissue} tissue blocks matched "
                       f"(need >= {o.min_blocks} and >= {o.min_matched:.0%})")
    if shift is not None and shift > o.max_residual_um:
        reasons.append(f"not converged: matched blocks still moved {shift:.2f} µm (median) in the second pass "
                       f"(> {o.max_residual_um:g} µm)")
    if det <= 0:
        reasons.append("the affine mirrors the section")
    elif abs(angle) > o.max_rotation + 1.0:
        reasons.append(f"rotation {angle:.1f}° beyond the searched ±{o.max_rotation:g}°")
    if det > 0 and (lo < 1 - o.max_scale_change or hi > 1 + o.max_scale_change):
        reasons.append(f"implausible scale {lo:.3f}-{hi:.3f} of the pixel-size ratio "
                       f"(allowed 1 ± {o.max_scale_change:g})")
    return {"passed": not reasons, "reasons": reasons, "blocks_valid": valid, "blocks_tissue": tissue,
            "matched": round(matched, 3), "pass2_shift_um_median": None if shift is None else round(shift, 3),
            "rotation_deg": round(angle, 3), "scale": [round(lo, 4), round(hi, 4)], "mirrored": det <= 0,
            "bar": {"min_blocks": o.min_blocks, "min_matched": o.min_matched,
                    "max_residual_um": o.max_residual_um, "max_scale_change": o.max_scale_change,
                    "max_rotation": o.max_rotation + 1.0}}


def _to_level0(t_view: Transform, ds_a: float, ds_h: float) -> Transform:
    """An affine between block-mean views -> the same between level-0 pixels."""
    ca, ch = (ds_a - 1) / 2, (ds_h - 1) / 2
    lin = t_view.affine[:, :2] * ds_h / ds_a
    # level-0 u = ds_h * (A_lin (x - ca)/ds_a + t) + ch
    t = ds_h * t_view.affine[:, 2] + ch - lin @ np.array([ca, ca])
    return Transform(np.column_stack([lin, t]))


# ----------------------------------------------------------------------------- per-patch residual


MIN_PATCH_CONFIDENCE = 0.3  # below this a patch shares too little structure for its shift to be trusted
MIN_PATCH_GAIN = 0.1  # a shift is real when it raises the patch's NCC by at least this much
CHECK_SAMPLE = 24  # patches measured on a slide without a registration


def patch_residual(af_patch: np.ndarray, he_patch: np.ndarray) -> tuple[float, float, float]:
    """Misalignment of one (AF (h, w, C), H&E (h, w, 3)) patch.

    (shift in pixels, NCC after the shift, NCC gain of the shift over no shift):
    noise peaks barely raise the NCC, a real misalignment does.
    """
    a, b = af_view(af_patch), he_view(he_patch)
    s, c = shift_of(a, b, upsample=4)
    return float(np.hypot(*s)), c, c - ncc(a, b)


@dataclass
class PatchCheck:
    """Residual misalignment measured on the patches of one slide."""

    shift_um: np.ndarray  # per measured patch
    confidence: np.ndarray
    gain: np.ndarray
    dropped: np.ndarray  # bool per measured patch: trusted shift above the limit

    def summary(self, max_shift_um: float) -> dict:
        trusted = self.confidence >= MIN_PATCH_CONFIDENCE
        sh = self.shift_um[trusted]
        return {"max_shift_um": max_shift_um, "measured": int(len(self.shift_um)), "trusted": int(trusted.sum()),
                "dropped": int(self.dropped.sum()),
                "median_shift_um": round(float(np.median(sh)), 3) if sh.size else None}


def check_patches(af_reader, he_reader, transform: Transform | None, xy: list[tuple[int, int]], size: int,
                  mpp: float, max_shift_um: float) -> PatchCheck:
    """Measure the AF / H&E misalignment of each patch at ``xy`` (H&E read through ``transform``).

    A patch is dropped when its shift is trusted (confidence >= MIN_PATCH_CONFIDENCE,
    NCC gain >= MIN_PATCH_GAIN) and larger than ``max_shift_um``.
    """
    shifts, confs, gains = np.zeros(len(xy)), np.zeros(len(xy)), np.zeros(len(xy))
    for k, (x, y) in enumerate(xy):
        af = af_reader.read_region(x, y, size, size)
        he = read_registered(he_reader, transform, x, y, size, size)
        shifts[k], confs[k], gains[k] = patch_residual(af, he)
    shift_um = shifts * mpp
    dropped = (confs >= MIN_PATCH_CONFIDENCE) & (gains >= MIN_PATCH_GAIN) & (shift_um > max_shift_um)
    return PatchCheck(shift_um, confs, gains, dropped)


def sample_positions(n: int, k: int = CHECK_SAMPLE) -> np.ndarray:
    """Indices of ``k`` patches spread evenly over ``n``."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)) if n else np.zeros(0, int)


def registered_thumbnail(af_reader, he_reader, transform: Transform, max_size: int) -> tuple[np.ndarray, float]:
    """An H&E thumbnail on the AF pixel grid (through ``transform``) and its downsample from AF level 0."""
    ds = max(1, int(np.ceil(max(af_reader.width, af_reader.height) / max_size)))
    he_thumb, ds_h = he_reader.thumbnail(max(16, int(np.ceil(max(he_reader.width, he_reader.height) / ds))))
    shape = (af_reader.height // ds, af_reader.width // ds)
    out = warp_view(he_thumb.astype(np.float32), transform.scaled(ds, ds_h), shape)
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8), float(ds)


def on_slide(transform: Transform, xy: list[tuple[int, int]], size: int, width: int, height: int) -> np.ndarray:
    """Per patch: whether all of its H&E (the patch border, every ``size / 8`` px, through ``transform``)
    lies on the ``width`` x ``height`` H&E slide."""
    if not xy:
        return np.zeros(0, bool)
    e = np.linspace(0, size - 1, 9)
    bx = np.concatenate([e, e, np.zeros(9), np.full(9, size - 1.0)])
    by = np.concatenate([np.zeros(9), np.full(9, size - 1.0), e, e])
    p = np.asarray(xy, np.float64)
    u, v = transform.map(p[:, :1] + bx, p[:, 1:] + by)
    return ((u >= 0) & (v >= 0) & (u <= width - 1) & (v <= height - 1)).all(axis=1)


def alignment_check(af_reader, he_reader, transform: Transform | None, xy: list[tuple[int, int]], size: int,
                    mpp: float | None, max_shift_um: float) -> tuple[np.ndarray, dict, str | None]:
    """``tile``'s residual check: (keep flag per patch, summary, warning or None).

    Registered pairs: patches whose H&E lies partly off the H&E slide are
    dropped (``off_slide``: part of their H&E would be made-up glass); every
    other patch is measured and those still misaligned by more than
    ``max_shift_um`` are dropped. Unregistered pairs: a sample of patches is
    measured, nothing is dropped, and a slide whose median shift exceeds the
    limit gets a warning.
    """
    mpp = mpp or 0.5
    keep = np.ones(len(xy), bool)
    if transform is not None:
        keep = on_slide(transform, xy, size, he_reader.width, he_reader.height)
        idx = np.flatnonzero(keep)
        check = check_patches(af_reader, he_reader, transform, [xy[i] for i in idx], size, mpp, max_shift_um)
        keep[idx[check.dropped]] = False
        return keep, {"registered": True, **check.summary(max_shift_um), "off_slide": int(len(xy) - len(idx))}, None
    idx = sample_positions(len(xy))
    check = check_patches(af_reader, he_reader, None, [xy[i] for i in idx], size, mpp, max_shift_um)
    info = {"registered": False, **check.summary(max_shift_um), "dropped": 0}
    med = info["median_shift_um"]
    warning = None
    if med is not None and med > max_shift_um:
        warning = (f"AF and H&E look misaligned (median shift {med:.1f} µm over {info['trusted']} sampled patches "
                   f"> --max-shift {max_shift_um:g} µm); run vstain register and tile its pairs.csv")
    elif len(idx) >= 8 and info["trusted"] < len(idx) / 4:
        warning = (f"AF and H&E look misaligned (only {info['trusted']} of {len(idx)} sampled patches match "
                   "anywhere near); run vstain register and tile its pairs.csv")
    return keep, info, warning
