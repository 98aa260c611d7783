"""Slide scale: present a slide at the model's µm/px, and bring results back to the slide's.

``plan_scale`` compares the slide's µm/px (from its metadata, or ``--mpp``) with
the training scale of the run: within ``SCALE_TOLERANCE`` the slide is used as
it is; beyond it ``ResampledSlide`` presents the slide at the model's scale and
``resample_strips`` brings the finished strips of the result back to the
slide's own pixel grid.

Both use one separable rule per axis, a pure function of absolute pixel
position (so overlapping regions read identical pixels): shrinking averages
the source pixels under each output pixel, weighted by their overlap (exact
area averaging: a 2x shrink is the 2x2 mean of a pyramid level); enlarging
interpolates linearly between pixel centres, edges clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from vstain_cli.io.slide_base import SlideBase, SlideReader

SCALE_TOLERANCE = 0.10  # a slide within 10 % of the model's µm/px is used as it is
ROW_CHUNK = 256         # output rows resampled at once (bounds memory)


# ----------------------------------------------------------------------------- weights


def axis_weights(start: int, stop: int, factor: float, n_src: int) -> tuple[int, int, np.ndarray]:
    """Weights mapping source pixels to output pixels ``start..stop-1`` along one axis.

    ``factor``: source pixels per output pixel. Returns ``(s0, s1, W)`` with
    ``W`` of shape (stop - start, s1 - s0): output = W @ source[s0:s1].
    """
    if factor <= 0 or n_src < 1 or stop <= start:
        raise ValueError(f"bad resampling axis: factor {factor}, {n_src} source px, outputs {start}..{stop}")
    i = np.arange(start, stop, dtype=np.float64)
    if factor > 1.0:  # shrink: area average over [i f, (i + 1) f)
        lo = np.clip(i * factor, 0, n_src)
        hi = np.clip((i + 1) * factor, 0, n_src)
        s0 = int(np.floor(lo.min()))
        s1 = max(int(np.ceil(hi.max())), s0 + 1)
        j = np.arange(s0, s1, dtype=np.float64)
        w = np.clip(np.minimum(hi[:, None], j[None, :] + 1) - np.maximum(lo[:, None], j[None, :]), 0, None)
        empty = w.sum(axis=1) == 0  # an output pixel past the source (rounding at the far edge)
        w[empty, -1] = 1.0
    else:  # enlarge (or identity): linear between pixel centres
        s = np.clip((i + 0.5) * factor - 0.5, 0, n_src - 1)
        j0 = np.floor(s).astype(np.int64)
        t = s - j0
        j1 = np.minimum(j0 + 1, n_src - 1)
        s0, s1 = int(j0.min()), int(j1.max()) + 1
        w = np.zeros((stop - start, s1 - s0))
        rows = np.arange(stop - start)
        np.add.at(w, (rows, j0 - s0), 1.0 - t)
        np.add.at(w, (rows, j1 - s0), t)
    return s0, s1, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _taps(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A banded weight matrix (n, m) as (indices, weights), each (n, taps): its non-zeros per row."""
    taps = max(1, int((w > 0).sum(axis=1).max()))
    idx = np.argsort(w <= 0, axis=1, kind="stable")[:, :taps]  # the non-zero columns first, in order
    return idx, np.take_along_axis(w, idx, axis=1)


def _apply(block: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """(hs, ws, C) -> (len(wy), len(wx), C) float32: rows, then columns, a few taps each."""
    b = block.astype(np.float32, copy=False)
    iy, vy = _taps(wy)
    rows = vy[:, 0, None, None] * b[iy[:, 0]]
    for t in range(1, iy.shape[1]):
        rows += vy[:, t, None, None] * b[iy[:, t]]
    ix, vx = _taps(wx)
    out = vx[None, :, 0, None] * rows[:, ix[:, 0]]
    for t in range(1, ix.shape[1]):
        out += vx[None, :, t, None] * rows[:, ix[:, t]]
    return out


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- the scale decision


@dataclass
class SlideScale:
    """How a slide's pixels relate to the model's, and the scale its outputs are written at."""

    slide_mpp: float | None          # µm/px the slide is taken to have
    source: str                      # "file", "--mpp", "assumed (training scale)" or "unknown"
    model_mpp: float | None          # the run's training µm/px
    factor: float = 1.0              # slide px per model px; 1.0 = used as it is
    warnings: list[str] = field(default_factory=list)

    @property
    def resample(self) -> bool:
        return self.factor != 1.0

    @property
    def out_mpp(self) -> float | None:
        """µm/px of the outputs: the slide's own."""
        return self.slide_mpp

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("warnings")
        return {**d, "resampled": self.resample, "tolerance": SCALE_TOLERANCE}


def plan_scale(file_mpp: float | None, override: float | None, model_mpp: float | None,
               name: str = "the slide", tolerance: float = SCALE_TOLERANCE) -> SlideScale:
    """Decide whether a slide is resampled to the model's scale (see the module docstring)."""
    if override is not None and not 0.01 <= override <= 100:
        raise ValueError(f"--mpp must be between 0.01 and 100 µm per pixel, got {override}")
    if override is not None:
        mpp, source = float(override), "--mpp"
    elif file_mpp:
        mpp, source = float(file_mpp), "file"
    else:
        mpp, source = None, "unknown"
    if mpp is None:
        if model_mpp:
            return SlideScale(float(model_mpp), "assumed (training scale)", float(model_mpp), 1.0, [
                f"{name} records no µm/px; assuming the model's training scale, {model_mpp:g} µm/px "
                "(pass --mpp to set it)"])
        return SlideScale(None, "unknown", None, 1.0, [
            f"{name} records no µm/px and the run no training scale; assuming the slide matches the "
            "training data's pixel size (pass --mpp and retile to record it)"])
    if not model_mpp:  # a run made before datasets recorded their scale: used as it is (recorded, no warning)
        return SlideScale(mpp, source, None, 1.0)
    factor = float(model_mpp) / mpp
    if abs(mpp / float(model_mpp) - 1.0) <= tolerance:
        factor = 1.0
    return SlideScale(mpp, source, float(model_mpp), factor)


# ----------------------------------------------------------------------------- reader


class ResampledSlide(SlideBase):
    """A slide presented at another scale: ``factor`` source pixels per pixel of this view.

    Level 0 is ``round(source size / factor)``, computed from the finest source
    level at least 2x finer than it (level 0 unless the slide is 4x finer than
    the model). Reduced levels halve it, one for each source level at least as
    coarse as the model's scale (so thumbnails stay cheap and match the
    source's), each read from the coarsest source level not coarser than it. Integer
    pixels are rounded back to the source dtype, like the pyramid writer's levels.
    """

    def __init__(self, source: SlideReader, factor: float, mpp: float | None = None):
        if factor <= 0:
            raise ValueError(f"resampling factor must be positive, got {factor}")
        self.source, self.factor = source, float(factor)
        self.path, self.channels, self.dtype = source.path, source.channels, source.dtype
        self.format = getattr(source, "format", None)
        self.width = max(1, int(round(source.width / factor)))
        self.height = max(1, int(round(source.height / factor)))
        self.mpp = mpp if mpp is not None else (source.mpp * factor if source.mpp else None)
        coarse = sum(1 for sw, _ in source.level_dimensions if source.width / sw >= factor * (1 - 1e-6))
        self.level_dimensions = [(self.width, self.height)]
        for k in range(1, coarse):
            w, h = self.width // 2**k, self.height // 2**k
            if min(w, h) < 4:
                break
            self.level_dimensions.append((w, h))

    def _source_level(self, level: int) -> tuple[int, float, float]:
        """(source level, y factor, x factor) to read a level of this view from."""
        lw, lh = self.level_dimensions[level]
        want = self.source.width / lw  # level-0 source px per px of this level
        limit = want / 2 if level == 0 else want  # level 0: average at least 2x2 source pixels when shrinking
        best = 0
        for i, (sw, _) in enumerate(self.source.level_dimensions):
            if self.source.width / sw <= limit * (1 + 1e-6):
                best = i
        sw, sh = self.source.level_dimensions[best]
        return best, sh / lh, sw / lw

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        out, box = self._blank_and_box(x, y, w, h, level)
        if box is None:
            return out
        x0, y0, x1, y1 = box
        sl, fy, fx = self._source_level(level)
        if fy == fx == 1.0:  # this level is a source level: its pixels as they are
            return self.source.read_region(x, y, w, h, level=sl)
        sw, sh = self.source.level_dimensions[sl]
        xs0, xs1, wx = axis_weights(x0, x1, fx, sw)
        for r0 in range(y0, y1, ROW_CHUNK):
            r1 = min(r0 + ROW_CHUNK, y1)
            ys0, ys1, wy = axis_weights(r0, r1, fy, sh)
            block = self.source.read_region(xs0, ys0, xs1 - xs0, ys1 - ys0, level=sl)
            out[r0 - y : r1 - y, x0 - x : x1 - x] = _cast(_apply(block, wy, wx), self.dtype)
        return out

    def close(self) -> None:
        self.source.close()


def output_size(slide: SlideReader) -> tuple[int, int]:
    """(height, width) outputs of ``slide`` are written at: the original slide's own grid."""
    src = slide.source if isinstance(slide, ResampledSlide) else slide
    return src.height, src.width


def to_slide_grid(strips: Iterable[np.ndarray], slide: SlideReader) -> Iterable[np.ndarray]:
    """Strips computed on ``slide``'s grid, brought to the original slide's grid (identity if not resampled)."""
    if not isinstance(slide, ResampledSlide):
        return strips
    return resample_strips(strips, slide.height, slide.width, slide.source.height, slide.source.width)


# ----------------------------------------------------------------------------- strips


def resample_strips(strips: Iterable[np.ndarray], height: int, width: int, out_height: int, out_width: int,
                    chunk: int = ROW_CHUNK) -> Iterator[np.ndarray]:
    """Resample a stream of row strips of a (height, width, C) image to (out_height, out_width, C).

    Holds only the input rows the next ``chunk`` output rows need (plus one
    strip), never the image. Output strips keep the input dtype (rounded for
    integers).
    """
    fy, fx = height / out_height, width / out_width
    _, _, wx = axis_weights(0, out_width, fx, width)  # every output column needs all input columns
    buf: np.ndarray | None = None
    base = 0  # input row of buf[0]
    seen = 0
    o0 = 0
    it = iter(strips)
    done = False
    while o0 < out_height:
        o1 = min(o0 + chunk, out_height)
        s0, s1, wy = axis_weights(o0, o1, fy, height)
        while seen < s1 and not done:
            try:
                strip = np.asarray(next(it))
            except StopIteration:
                done = True
                break
            if strip.ndim == 2:
                strip = strip[:, :, None]
            if strip.shape[1] != width:
                raise ValueError(f"strip of width {strip.shape[1]}, expected {width}")
            buf = strip if buf is None else np.concatenate([buf, strip], axis=0)
            seen += strip.shape[0]
        if seen < s1:
            raise ValueError(f"strips gave {seen} rows, expected {height}")
        yield _cast(_apply(buf[s0 - base : s1 - base], wy, wx), buf.dtype)
        o0 = o1
        if o0 < out_height:
            keep = axis_weights(o0, min(o0 + chunk, out_height), fy, height)[0]
            buf = buf[keep - base :]
            base = keep
    for strip in it:  # drain (and check) what is left
        seen += np.asarray(strip).shape[0]
    if seen != height:
        raise ValueError(f"strips gave {seen} rows, expected {height}")


def mask_on_slide_grid(mask: Any, slide: SlideReader) -> Any:
    """A tissue mask made on ``slide`` (``io/masks.SlideMask``) that looks boxes up on the original slide's grid."""
    if not isinstance(slide, ResampledSlide):
        return mask
    import copy

    view = copy.copy(mask)
    view.downsample = mask.downsample * slide.source.width / slide.width
    return view
