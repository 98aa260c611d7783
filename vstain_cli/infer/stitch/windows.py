"""Windows: cut a canvas into overlapping model-sized windows, weight them, and fuse window
predictions at every sampler step (MultiDiffusion, Bar-Tal et al. 2023, eq. 3-5)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------- windows


def _axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``window - overlap``, last one flush."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _check_window(window: int, overlap: int) -> None:
    if window < 1:
        raise ValueError(f"window must be a positive number of pixels, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window) = [0, {window}), got {overlap}")


def window_grid(height: int, width: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of windows covering a ``height x width`` region.

    Windows are ``window`` pixels square and step by ``window - overlap``; the last
    window of a row/column is moved back to lie flush with the border (so it may
    overlap its neighbour by more than ``overlap``). A side shorter than ``window``
    gets the single start 0: the caller reflect-pads the canvas to ``window``
    (``CanvasDenoiser`` does this itself) and crops the result.
    """
    _check_window(window, overlap)
    if height < 1 or width < 1:
        raise ValueError(f"region must be at least 1x1 pixels, got {height}x{width}")
    return [(y, x) for y in _axis_starts(height, window, overlap)
            for x in _axis_starts(width, window, overlap)]


def _cosine_ramp(length: int) -> np.ndarray:
    """sin^2 ramp of ``length`` pixel centres in (0, 1); ramp[j] + ramp[length-1-j] = 1."""
    j = np.arange(length, dtype=np.float64)
    return np.sin(0.5 * np.pi * (j + 0.5) / length) ** 2


def feather_weights(window: int, overlap: int) -> np.ndarray:
    """Separable (window, window) float32 weights: cosine ramps over ``overlap`` px.

    Per axis, a pixel at distance d from the nearest window edge (d = 0 at the edge
    pixel) weighs sin^2(pi/2 * (d + 1/2) / overlap) for d < overlap and 1 inside.
    Every weight is > 0 (no division by zero where only one window covers a pixel),
    and where two windows stepped by ``window - overlap`` overlap, their weights sum
    to exactly 1 (sin^2 + cos^2), so fused predictions are a partition-of-unity blend.
    ``overlap = 0`` gives all ones.
    """
    _check_window(window, overlap)
    w = np.ones(window, dtype=np.float64)
    if overlap > 0:
        ramp = _cosine_ramp(overlap)
        n = min(overlap, (window + 1) // 2)
        w[:n] = np.minimum(w[:n], ramp[:n])
        w[window - n:] = np.minimum(w[window - n:], ramp[:n][::-1])
    return np.outer(w, w).astype(np.float32)


def _reflect_index(n: int, before: int, after: int) -> np.ndarray:
    """Indices that reflect-pad an axis of length ``n`` (numpy 'reflect', any width)."""
    idx = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx > n - 1, period - idx, idx)


def _reflect_pad(x: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """Reflect-pad the last two axes of ``x`` at the bottom/right to at least height x width."""
    if x is None:
        return None
    h, w = x.shape[-2:]
    if h >= height and w >= width:
        return x
    iy = torch.as_tensor(_reflect_index(h, 0, max(0, height - h)), device=x.device)
    ix = torch.as_tensor(_reflect_index(w, 0, max(0, width - w)), device=x.device)
    return x.index_select(-2, iy).index_select(-1, ix)


def _pad_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = mask.shape
    if h >= height and w >= width:
        return mask
    iy = _reflect_index(h, 0, max(0, height - h))
    ix = _reflect_index(w, 0, max(0, width - w))
    return mask[np.ix_(iy, ix)]


# ----------------------------------------------------------------------------- fusion


class _WindowFusion:
    """Cut windows from canvases, run a function on batches, fuse with weights.

    MultiDiffusion (Bar-Tal et al. 2023, eq. 3-5): the canvas prediction that best
    agrees (weighted least squares) with every window's prediction is, per pixel,
    Phi(J) = sum_i W_i * F_i(J) / sum_i W_i, with F_i the window predictions and W_i
    their weights mapped onto the canvas.
    """

    def __init__(self, window: int, overlap: int, batch_size: int, mask: np.ndarray | None,
                 min_tissue: float, time_net: bool = False) -> None:
        _check_window(window, overlap)
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.min_tissue = float(min_tissue)
        self.time_net = time_net
        self._weights = feather_weights(window, overlap)
        self._plans: dict[tuple[int, int], tuple[list, list, np.ndarray]] = {}
        self._torch_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.windows_evaluated = 0
        self.windows_skipped = 0
        self.net_calls = 0
        self.net_seconds = 0.0

    def reset_counters(self) -> None:
        """Zero the window / call / time counters."""
        self.windows_evaluated = self.windows_skipped = self.net_calls = 0
        self.net_seconds = 0.0

    def plan(self, height: int, width: int) -> tuple[list, list, np.ndarray]:
        """(kept windows, skipped windows, weight sum (H, W)) for a padded canvas size."""
        key = (height, width)
        if key not in self._plans:
            grid = window_grid(height, width, self.window, self.overlap)
            keep, skip = grid, []
            if self.mask is not None:
                m = _pad_mask(self.mask, height, width)
                if m.shape != (height, width):
                    raise ValueError(f"tissue mask is {m.shape}, canvas is {(height, width)}")
                w = self.window
                frac = [m[y:y + w, x:x + w].mean() for y, x in grid]
                keep = [p for p, f in zip(grid, frac) if f > self.min_tissue]
                skip = [p for p, f in zip(grid, frac) if f <= self.min_tissue]
            den = np.zeros((height, width), np.float64)
            for y, x in keep:
                den[y:y + self.window, x:x + self.window] += self._weights
            self._plans[key] = (keep, skip, den)
        return self._plans[key]

    def coverage_mask(self, height: int, width: int) -> np.ndarray:
        """Pixels (H, W) that at least one evaluated window covers."""
        hp, wp = max(height, self.window), max(width, self.window)
        return self.plan(hp, wp)[2][:height, :width] > 0

    def _tensors(self, height, width, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, str(device), dtype)  # weights and their sum, cached per canvas
        if key not in self._torch_cache:
            den = self.plan(height, width)[2]
            self._torch_cache[key] = (
                torch.as_tensor(self._weights, device=device, dtype=dtype),
                torch.as_tensor(den, device=device, dtype=dtype),
            )
        return self._torch_cache[key]

    def fuse(self, fn: Callable[..., torch.Tensor], canvases: Sequence[torch.Tensor | None],
             extra: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused prediction (B, C_out, H, W) and the coverage (1, 1, H, W) of padded canvases.

        ``fn(*window_batches, extra_batch)`` is called on batches of windows; ``extra``
        is a per-canvas tensor (B,) (the timestep) gathered per window, or None.
        """
        b, _, height, width = like.shape
        keep, skip, _ = self.plan(height, width)
        sync = self.time_net and like.device.type == "cuda"
        acc = None  # accumulation dtype: at least float32 (bf16/fp16 networks)
        items = [(i, y, x) for i in range(b) for y, x in keep]
        self.windows_skipped += b * len(skip)
        w = self.window
        out = None
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            args = [None if c is None else torch.stack([c[i, :, y:y + w, x:x + w] for i, y, x in chunk])
                    for c in canvases]
            if extra is not None:
                args.append(extra[torch.as_tensor([i for i, _, _ in chunk], device=extra.device)])
            if sync:
                torch.cuda.synchronize(like.device)
            t0 = time.perf_counter()
            pred = fn(*args)
            if sync:
                torch.cuda.synchronize(like.device)
            self.net_seconds += time.perf_counter() - t0
            self.net_calls += 1
            self.windows_evaluated += len(chunk)
            if out is None:
                acc = torch.promote_types(pred.dtype, torch.float32)
                weight, den = self._tensors(height, width, like.device, acc)
                out = torch.zeros((b, pred.shape[1], height, width), device=like.device, dtype=acc)
                out_dtype = pred.dtype
            pred = pred.to(acc) * weight
            for k, (i, y, x) in enumerate(chunk):
                out[i, :, y:y + w, x:x + w] += pred[k]
        covered = torch.as_tensor(self.plan(height, width)[2] > 0, device=like.device)[None, None]
        if out is None:  # nothing to evaluate: every window was background
            return torch.zeros_like(like), covered
        out = torch.where(covered, out / den.clamp_min(1e-12), out)
        return out.to(out_dtype), covered


# ----------------------------------------------------------------------------- canvas models


def _as_alpha_bar(alpha_bar: torch.Tensor | np.ndarray | Callable[[torch.Tensor], torch.Tensor]):
    if callable(alpha_bar):
        return alpha_bar
    table = torch.as_tensor(np.asarray(alpha_bar), dtype=torch.float64)

    def lookup(t: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t.long().clamp(0, len(table) - 1)]

    return lookup


def constant_fill(value: float, alpha_bar, prediction: str = "eps") -> Callable:
    """A fill ``fill(x_t, t) -> pred`` whose prediction leads every pixel to x0 = ``value``.

    For background (skipped) pixels: with x0 = v fixed, the network target is
    eps = (x_t - sqrt(a) v) / sqrt(1 - a) ("eps"), v_pred = sqrt(a) eps - sqrt(1 - a) v
    ("v", Salimans & Ho 2022, eq. 7) or v itself ("x0"), where a = alpha_bar(t)
    (Ho et al. 2020, eq. 4). ``alpha_bar`` is the schedule's cumulative product
    (a 1-D table indexed by integer t) or a callable t -> alpha_bar. White is
    ``value = 1.0`` in the [-1, 1] model space.
    """
    if prediction not in ("eps", "v", "x0"):
        raise ValueError(f"prediction must be eps, v or x0, got {prediction!r}")
    lookup = _as_alpha_bar(alpha_bar)

    def fill(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        a = lookup(t).to(device=x_t.device, dtype=torch.float64).expand(x_t.shape[0])
        a = a.reshape(-1, 1, 1, 1)
        x0 = torch.full_like(x_t, value, dtype=torch.float64)
        if prediction == "x0":
            return x0.to(x_t.dtype)
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).clamp_min(1e-12).sqrt()
        if prediction == "eps":
            return eps.to(x_t.dtype)
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x_t.dtype)

    return fill


class CanvasDenoiser:
    """A window network made into a canvas model with the same call signature.

    ``net(x_t (B, 3, w, w), t (B,), cond (B, Cc, w, w)) -> pred (B, Co, w, w)``
    becomes ``model(x_t (B, 3, H, W), t, cond (B, Cc, H, W)) -> pred (B, Co, H, W)``
    for any H, W: windows of ``window`` px overlapping by ``overlap`` are cut from
    the canvas, run in batches of ``batch_size``, and their predictions fused with
    ``feather_weights`` (MultiDiffusion, Bar-Tal et al. 2023, eq. 5). A sampler
    given this model denoises the whole canvas jointly from one noise canvas.
    ``overlap = 0`` gives independent tiles (on a shared noise canvas).

    Canvases smaller than a window are reflect-padded (x_t and cond alike) to the
    window size and the prediction is cropped back.

    ``mask`` (H, W) bool, optional: windows with a tissue fraction <= ``min_tissue``
    are not evaluated. Pixels that no evaluated window covers get ``fill(x_t, t)``
    (e.g. ``constant_fill(1.0, alpha_bar, prediction)`` so they converge to white),
    or zeros when ``fill`` is None; ``coverage_mask`` tells them apart so the writer
    can paint them as background.

    Counters for the overhead benchmark: ``windows_evaluated``, ``windows_skipped``,
    ``net_calls`` and ``net_seconds`` (time inside ``net``; on CUDA exact only with
    ``time_net=True``, which synchronises around every batch).
    """

    def __init__(self, net: Callable[..., torch.Tensor], window: int = 128, overlap: int = 32,
                 batch_size: int = 16, *, mask: np.ndarray | None = None, min_tissue: float = 0.0,
                 fill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 time_net: bool = False) -> None:
        self.net = net
        self.fill = fill
        self._fusion = _WindowFusion(window, overlap, batch_size, mask, min_tissue, time_net)

    window = property(lambda self: self._fusion.window)
    overlap = property(lambda self: self._fusion.overlap)
    windows_evaluated = property(lambda self: self._fusion.windows_evaluated)
    windows_skipped = property(lambda self: self._fusion.windows_skipped)
    net_calls = property(lambda self: self._fusion.net_calls)
    net_seconds = property(lambda self: self._fusion.net_seconds)

    def reset_counters(self) -> None:
        """Zero the window / call / time counters."""
        self._fusion.reset_counters()

    def coverage_mask(self, height: int, width: int) -> np.ndarray:
        """(H, W) bool: pixels covered by at least one evaluated (tissue) window."""
        return self._fusion.coverage_mask(height, width)

    def _call_net(self, x: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, cond)

    def __call__(self, x_t: torch.Tensor, t, cond: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x_t.shape
        hp, wp = max(h, self.window), max(w, self.window)
        t_vec = torch.as_tensor(t, device=x_t.device).reshape(-1)
        if t_vec.numel() == 1:
            t_vec = t_vec.expand(b)
        xp, cp = _reflect_pad(x_t, hp, wp), _reflect_pad(cond, hp, wp)
        with torch.no_grad():  # inference only: no graph over thousands of windows
            pred, covered = self._fusion.fuse(self._call_net, [xp, cp], t_vec, xp)
        pred, covered = pred[..., :h, :w], covered[..., :h, :w]
        if self.fill is not None and not bool(covered.all()):
            pred = torch.where(covered, pred, self.fill(x_t, t_vec).to(pred.dtype))
        return pred


def blend_predictions(net: Callable[[torch.Tensor], torch.Tensor], cond_canvas: torch.Tensor,
                      window: int = 128, overlap: int = 32, batch_size: int = 16, *,
                      mask: np.ndarray | None = None, fill_value: float = 1.0) -> torch.Tensor:
    """Feather-blend a deterministic model ``net(cond (B, Cc, w, w)) -> (B, Co, w, w)``.

    For regression / pix2pix generators: one pass of windows over ``cond_canvas``
    (B, Cc, H, W), fused exactly like ``CanvasDenoiser``. Pixels covered by no
    evaluated window (masked background) get ``fill_value`` (1.0 = white in [-1, 1]).
    """
    fusion = _WindowFusion(window, overlap, batch_size, mask, 0.0)
    h, w = cond_canvas.shape[-2:]
    cp = _reflect_pad(cond_canvas, max(h, window), max(w, window))
    with torch.no_grad():
        pred, covered = fusion.fuse(net, [cp], None, cp)
    pred, covered = pred[..., :h, :w], covered[..., :h, :w]
    return torch.where(covered, pred, torch.full_like(pred, fill_value))


