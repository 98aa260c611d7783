"""Per-pixel credible intervals from diffusion samples, and their calibration.

The paper's recipe (Sridhar et al. 2023): N = 20 samples per input, per-pixel 5th
and 95th percentiles [l, u], and a factor lambda calibrated on the validation
split (lambda = 1.32 in the paper). lambda enters in one of two forms (``FORMS``):

* ``multiplicative`` — Conffusion's (Horwitz & Hoshen 2022), the form the paper's
  1.32 belongs to: on intensities in [0, 1], ``[l / lambda, u * lambda]``, clipped
  to [0, 1] (``multiplicative_interval``);
* ``centered`` — additive around the sample median c, as in im2im-uq
  (Angelopoulos et al. 2022) and RCPS (Bates et al. 2021):
  ``[c - lambda (c - l), c + lambda (u - c)]`` (``scaled_interval``).

Calibration is a risk-controlling prediction set (RCPS, Bates et al. 2021) in
either form:

    risk of an image  = fraction of its pixel-channel values outside the interval
    lambda_hat        = smallest lambda (scanned from large to small, stopping at the
                        first failure) whose Hoeffding-Bentkus upper confidence bound
                        of the mean risk stays below alpha

so that, with probability >= 1 - delta over the calibration set, the expected risk
on new images from the same distribution is <= alpha. See docs/uncertainty.md.

Arrays are numpy, (..., 3, H, W) float in the model's [-1, 1] space unless a
``value_range`` says otherwise (the centered form is invariant to affine maps of
targets and intervals; the multiplicative form is defined on [0, 1] and maps
``value_range`` onto it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import optimize, special, stats

from vstain_cli.errors import input_errors
from vstain_cli.provenance import read_format_json, write_json

FORMAT = "vstain-calibration"
FORMAT_VERSION = 2  # 2: the interval form is recorded (version 1 files are "centered")
FORMS = ("multiplicative", "centered")
DEFAULT_FORM = "multiplicative"  # the paper's (Conffusion); docs/uncertainty.md §1 says why
MODEL_RANGE = (-1.0, 1.0)
LAMBDA_STEP = 0.01
DEFAULT_LAMBDA_MAX = 10.0


def lambda_grid(lambda_max: float = DEFAULT_LAMBDA_MAX) -> np.ndarray:
    """The lambda grid searched by calibration: 0.00, 0.01, ..., ``lambda_max`` (rounded to 0.01)."""
    n = int(round(float(lambda_max) / LAMBDA_STEP))
    if n < 1:
        raise ValueError(f"lambda_max must be at least {LAMBDA_STEP}, got {lambda_max}")
    return np.arange(n + 1) / round(1 / LAMBDA_STEP)


DEFAULT_LAMBDAS = lambda_grid()  # 0.00, 0.01, ..., 10.00

# ----------------------------------------------------------------------------- intervals


def _quantile_sorted(s: np.ndarray, q: float) -> np.ndarray:
    """Quantile q of samples sorted along axis 0; linear interpolation (numpy's default)."""
    pos = q * (s.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.shape[0] - 1)
    frac = np.float32(pos - lo)
    return s[lo] + frac * (s[hi] - s[lo])


def sample_quantiles(samples, q_low: float = 0.05, q_high: float = 0.95
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, median, mean) per pixel-channel of ``samples`` (N, ...), float32.

    ``samples`` are N diffusion samples of one input (e.g. (20, 3, H, W)); quantiles
    interpolate linearly between order statistics (numpy's "linear", Hyndman & Fan
    type 7), from one sort along the sample axis.
    """
    if not 0.0 <= q_low < 0.5 < q_high <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= q_low < 0.5 < q_high <= 1, got {q_low}, {q_high}")
    s = np.sort(np.asarray(samples, dtype=np.float32), axis=0)
    if s.ndim < 1 or s.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per input, got {s.shape[0] if s.ndim else 0}")
    return (_quantile_sorted(s, q_low), _quantile_sorted(s, q_high),
            _quantile_sorted(s, 0.5), s.mean(axis=0))


def check_form(form: str) -> str:
    """``form`` when it is one of ``FORMS``; ValueError naming the choices otherwise."""
    if form not in FORMS:
        raise ValueError(f"unknown interval form {form!r} (choose from {', '.join(FORMS)})")
    return form


def scaled_interval(lower, upper, center, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The centered form: the interval scaled by ``lam`` around ``center`` (the sample median),

        [center - lam * (center - lower), center + lam * (upper - center)]

    additive, as im2im-uq (Angelopoulos et al. 2022) scales its interval around the
    point prediction. ``lam = 1`` is the raw quantile interval, ``lam > 1`` widens
    it; the two sides keep their own widths, so skewed sample distributions stay
    skewed. ``center`` is clipped into [lower, upper].
    """
    lower, upper = np.asarray(lower), np.asarray(upper)
    c = np.clip(np.asarray(center), lower, upper)
    return c - lam * (c - lower), c + lam * (upper - c)


def _to_unit(x, value_range: tuple[float, float]) -> np.ndarray:
    a, b = value_range
    return np.clip((np.asarray(x, np.float64) - a) / (b - a), 0.0, 1.0)


def multiplicative_interval(lower, upper, lam: float, value_range: tuple[float, float] = MODEL_RANGE
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The multiplicative form of Conffusion (Horwitz & Hoshen 2022, §3.2), the paper's:

        [l / lam, u * lam]   on intensities l, u in [0, 1], clipped to [0, 1]

    ``value_range`` is the range of the arrays, mapped linearly onto [0, 1] and back
    (model space [-1, 1] by default; 0-255 maps pass (0, 255)). ``lam = 1`` is the
    raw interval; the widening grows with the intensity, so dark pixels widen
    little. Returns float64 arrays in ``value_range``.
    """
    a, b = value_range
    lo, hi = _to_unit(lower, value_range), _to_unit(upper, value_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(lo > 0, lo / lam, 0.0)
    lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi * lam, 0.0, 1.0)
    return a + (b - a) * lo, a + (b - a) * hi


def calibrated_interval(lower, upper, center, lam: float, form: str = DEFAULT_FORM,
                        value_range: tuple[float, float] = MODEL_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """The interval at ``lam`` in ``form`` ("multiplicative" or "centered"); lam = 1: [lower, upper] in both."""
    if check_form(form) == "centered" or lam == 1.0:
        return scaled_interval(lower, upper, center, lam)
    return multiplicative_interval(lower, upper, lam, value_range)


def clipped_width(lower, upper, value_range: tuple[float, float] = MODEL_RANGE) -> float:
    """Mean width of [lower, upper] clipped to ``value_range`` (the valid range of the values)."""
    a, b = value_range
    lo, hi = np.clip(np.asarray(lower, np.float64), a, b), np.clip(np.asarray(upper, np.float64), a, b)
    return float(np.mean(np.maximum(hi - lo, 0.0)))


@dataclass
class IntervalMaps:
    """Credible-interval maps of one input, each (..., 3, H, W) float32."""

    lower: np.ndarray
    upper: np.ndarray
    median: np.ndarray
    mean: np.ndarray

    @property
    def width(self) -> np.ndarray:
        """upper - lower: the per-pixel uncertainty map."""
        return self.upper - self.lower


def credible_interval(samples, lam: float = 1.0, q_low: float = 0.05, q_high: float = 0.95,
                      form: str = DEFAULT_FORM, value_range: tuple[float, float] = MODEL_RANGE) -> IntervalMaps:
    """Samples (N, ...) -> calibrated interval maps (quantiles, then ``lam`` in ``form``)."""
    lo, hi, med, mean = sample_quantiles(samples, q_low, q_high)
    lo, hi = calibrated_interval(lo, hi, med, lam, form, value_range)
    return IntervalMaps(lo.astype(np.float32), hi.astype(np.float32), med, mean)


# ----------------------------------------------------------------------------- risk


def pixel_risk(target, lower, upper, *, any_channel: bool = False) -> np.ndarray:
    """Per-image fraction of values outside [lower, upper]; leading axes are kept.

    Arrays are (..., C, H, W); the result has shape ``...`` (a 0-d array for one
    image). By default each pixel-channel value counts on its own (a pixel with one
    of three channels outside adds 1/3 pixel); ``any_channel=True`` counts a pixel
    as outside when any of its channels is. Bounds are inclusive.
    """
    t = np.asarray(target)
    out = (t < np.asarray(lower)) | (t > np.asarray(upper))
    if any_channel:
        return out.any(axis=-3).mean(axis=(-2, -1))
    return out.mean(axis=(-3, -2, -1))


def coverage(target, lower, upper, *, any_channel: bool = False) -> float:
    """Mean fraction of values inside [lower, upper] over all images (1 - mean risk)."""
    return float(1.0 - np.mean(pixel_risk(target, lower, upper, any_channel=any_channel)))


def required_lambda(target, lower, upper, center, form: str = DEFAULT_FORM,
                    value_range: tuple[float, float] = MODEL_RANGE) -> np.ndarray:
    """Smallest lambda at which each value is inside the interval of ``form`` at lambda.

    centered: lambda* = (c - y) / (c - l) below the centre, (y - c) / (u - c) above
    it, 0 at it, inf where that side has zero width.
    multiplicative (on [0, 1]): y is inside [l / lambda, u * lambda] iff
    lambda >= l / y and lambda >= y / u, so lambda* = max(l / y, y / u) (l / y = 0
    when l = 0, inf when y = 0 < l; y / u = 0 when y = 0, inf when u = 0 < y);
    the clip to [0, 1] never changes whether a y in [0, 1] is inside.
    Value y is outside at lambda iff lambda < lambda*, so the risk at lambda is the
    fraction of lambda* > lambda.
    """
    if check_form(form) == "multiplicative":
        y, lo, hi = (_to_unit(v, value_range) for v in (target, lower, upper))
        with np.errstate(divide="ignore", invalid="ignore"):
            below = np.where(lo > 0, np.where(y > 0, lo / y, np.inf), 0.0)
            above = np.where(y > 0, np.where(hi > 0, y / hi, np.inf), 0.0)
        return np.maximum(below, above)
    y = np.asarray(target, np.float64)
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    c = np.clip(np.asarray(center, np.float64), lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where(y < c, np.where(c > lo, (c - y) / (c - lo), np.inf), 0.0)
        above = np.where(y > c, np.where(hi > c, (y - c) / (hi - c), np.inf), 0.0)
    return np.maximum(below, above)


def image_risk_curve(target, lower, upper, center, lambdas=DEFAULT_LAMBDAS, form: str = DEFAULT_FORM,
                     value_range: tuple[float, float] = MODEL_RANGE) -> np.ndarray:
    """Risk of one image (C, H, W) at every lambda of the grid: (len(lambdas),) float64.

    One sort of the image's lambda* values, then a binary search per lambda: the
    cost does not grow with the grid, and images can be streamed one by one.
    """
    s = np.sort(required_lambda(target, lower, upper, center, form, value_range).ravel())
    inside = np.searchsorted(s, np.asarray(lambdas, np.float64), side="right")
    return 1.0 - inside / s.size


def interval_risks(targets, lower, upper, center, lambdas=DEFAULT_LAMBDAS, form: str = DEFAULT_FORM,
                   value_range: tuple[float, float] = MODEL_RANGE) -> np.ndarray:
    """Per-image risks of a batch (n, C, H, W) at every lambda: (len(lambdas), n)."""
    targets = np.asarray(targets)
    return np.stack([image_risk_curve(targets[i], lower[i], upper[i], center[i], lambdas, form, value_range)
                     for i in range(targets.shape[0])], axis=1)


# ----------------------------------------------------------------------------- HB bound


def _h1(a: float, b: float) -> float:
    """Bernoulli relative entropy h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(special.xlogy(a, a) - special.xlogy(a, b)
                     + special.xlogy(1 - a, 1 - a) - special.xlogy(1 - a, 1 - b))


def hb_pvalue(risk_hat: float, n: int, risk: float) -> float:
    """Hoeffding-Bentkus p-value of H0: mean risk >= ``risk`` (Bates et al. 2021, RCPS).

        p = min( exp(-n h1(min(risk_hat, risk), risk)),
                 e * P(Binom(n, risk) <= ceil(n * risk_hat)) )

    valid for losses bounded in [0, 1] (Hoeffding 1963; Bentkus 2004).
    """
    if risk >= 1.0:
        return 1.0 if risk_hat >= 1.0 else 0.0
    hoeffding = math.exp(-n * _h1(min(risk_hat, risk), risk))
    bentkus = math.e * float(stats.binom.cdf(math.ceil(n * risk_hat - 1e-9), n, risk))
    return min(1.0, hoeffding, bentkus)


def hb_ucb(risk_hat: float, n: int, delta: float = 0.1) -> float:
    """Hoeffding-Bentkus upper confidence bound of the mean risk at level 1 - delta.

    UCB = sup{ R in [risk_hat, 1] : hb_pvalue(risk_hat, n, R) >= delta }: the
    p-value is 1 at R = risk_hat and decreases to 0 at R = 1; the crossing is found
    by Brent's method (as RCPS's reference code does).
    """
    if n < 1:
        raise ValueError("the calibration set is empty")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    risk_hat = float(min(max(risk_hat, 0.0), 1.0))
    if risk_hat >= 1.0:
        return 1.0

    def gap(r: float) -> float:
        return hb_pvalue(risk_hat, n, r) - delta

    hi = 1.0 - 1e-12
    if gap(hi) >= 0:
        return 1.0
    return float(optimize.brentq(gap, risk_hat, hi, xtol=1e-12, rtol=1e-12, maxiter=500))


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """A calibrated interval scale: what ``calibrate`` writes to calibration.json."""

    lam: float
    alpha: float
    delta: float
    risk: float                 # empirical mean risk at lam on the calibration set
    ucb: float                  # its Hoeffding-Bentkus UCB (< alpha)
    n: int                      # calibration images
    q_low: float | None = 0.05  # quantiles of the samples (None for sources that are not samples)
    q_high: float | None = 0.95
    samples: int | None = None  # diffusion samples per input used for the quantiles
    interval: str = DEFAULT_FORM  # "multiplicative" (Conffusion, the paper's) or "centered" (im2im-uq)
    center: str = "median"
    risk_unit: str = "pixel-channel"
    grid: list[float] = field(default_factory=list)  # [min, max, count] of the lambda grid
    method: str = "rcps-hoeffding-bentkus"
    source: str = "samples"     # SOURCES: what lambda scales (files without it: "samples")

    def apply(self, lower, upper, center, value_range: tuple[float, float] = MODEL_RANGE
              ) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated interval: ``calibrated_interval(lower, upper, center, lam, interval, value_range)``."""
        return calibrated_interval(lower, upper, center, self.lam, self.interval, value_range)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with format tags."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    def to_json(self, path: str | Path) -> None:
        """Write atomically as JSON."""
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> Calibration:
        """Read a calibration.json; InputError (naming the file) when missing or corrupt."""
        path = Path(path)
        meta = read_format_json(
            path, FORMAT, missing=("calibration file not found (make one with `vstain calibrate`)", path),
            corrupt="corrupt calibration file", wrong="not a vstain calibration file (format field missing)")
        with input_errors(path):
            return cls.from_dict(meta)

    @classmethod
    def from_dict(cls, meta: dict[str, Any], where: str = "") -> Calibration:
        """Parse a calibration record (the file's top level, or one of its ``scales`` entries named ``where``);
        ValueError saying what is wrong (the readers name the file).

        Fields added after format version 1 are optional (``interval``: "centered";
        ``source``: "samples"), so older files read as what they were made as.
        """
        bad = f"corrupt calibration file{' (' + where + ')' if where else ''}"

        def opt(key: str, default: float | None) -> float | None:
            v = meta.get(key, default)
            return None if v is None else float(v)

        try:
            cal = cls(
                lam=float(meta["lam"]), alpha=float(meta["alpha"]), delta=float(meta["delta"]),
                risk=float(meta["risk"]), ucb=float(meta["ucb"]), n=int(meta["n"]),
                q_low=opt("q_low", 0.05), q_high=opt("q_high", 0.95),
                samples=None if meta.get("samples") is None else int(meta["samples"]),
                interval=str(meta.get("interval", "centered")),  # version 1 files were all centered
                center=str(meta.get("center", "median")),
                risk_unit=str(meta.get("risk_unit", "pixel-channel")),
                grid=[float(v) for v in meta.get("grid", [])],
                method=str(meta.get("method", "rcps-hoeffding-bentkus")),
                source=str(meta.get("source", "samples")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{bad} (bad or missing field {e})") from None
        if cal.interval not in FORMS:
            raise ValueError(f"{bad} (interval {cal.interval!r} is not one of {', '.join(FORMS)})")
        if cal.source not in SOURCES:
            raise ValueError(f"{bad} (source {cal.source!r} is not one of {', '.join(SOURCES)})")
        if not (math.isfinite(cal.lam) and cal.lam >= 0 and 0 < cal.alpha < 1 and 0 < cal.delta < 1):
            raise ValueError(f"{bad} (lam={cal.lam}, alpha={cal.alpha}, delta={cal.delta} out of range)")
        return cal


def calibrate_lambda(risks: np.ndarray | Callable[[float], np.ndarray], lambdas=DEFAULT_LAMBDAS,
                     alpha: float = 0.1, delta: float = 0.1, *, hint: str | None = None,
                     **meta: Any) -> Calibration:
    """RCPS calibration of the interval scale (Bates et al. 2021, Algorithm in §3).

    ``risks`` is either an array (len(lambdas), n) of per-image risks at each
    lambda (``interval_risks``) or a function lambda -> (n,) per-image risks. The
    risk must not increase with lambda (true in both forms: their intervals are nested). Lambdas are
    scanned from the largest down; lambda_hat is the last one whose HB UCB of the
    mean risk is < alpha before the first that is not. ``meta`` (q_low, q_high,
    samples, ...) is recorded in the result. ValueError when even the largest
    lambda fails (too few images, or a grid that stops too low); its message ends
    with ``hint`` (what to change; default: the arguments of this function).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lambdas = np.asarray(lambdas, np.float64)
    if lambdas.ndim != 1 or lambdas.size == 0:
        raise ValueError("the lambda grid must be a non-empty 1-D list")
    order = np.argsort(lambdas)[::-1]  # large -> small
    table = None if callable(risks) else np.asarray(risks, np.float64)
    if table is not None and (table.ndim != 2 or table.shape[0] != lambdas.size):
        raise ValueError(f"risks must be (len(lambdas), n) = ({lambdas.size}, n), got {table.shape}")
    chosen = None
    for k in order:
        r = np.asarray(risks(float(lambdas[k])) if table is None else table[k], np.float64)
        n = r.size
        if n == 0:
            raise ValueError("the calibration set is empty")
        risk_hat = float(r.mean())
        # UCB < alpha  <=>  p-value of H0 "risk >= alpha" < delta (p decreases in R):
        # one p-value per lambda instead of a root search.
        if hb_pvalue(risk_hat, n, alpha) >= delta:
            break
        chosen = (float(lambdas[k]), risk_hat, n)
    if chosen is None:
        raise ValueError(
            f"no lambda up to {lambdas.max():g} keeps the risk bound below alpha={alpha} "
            f"(UCB {hb_ucb(risk_hat, n, delta):.3f} at the largest lambda with {n} images); "
            + (hint or "use more calibration images, a grid (lambdas) that reaches higher, or a larger alpha"))
    lam, risk_hat, n = chosen
    ucb = hb_ucb(risk_hat, n, delta)
    grid = [float(lambdas.min()), float(lambdas.max()), float(lambdas.size)]
    return Calibration(lam=lam, alpha=alpha, delta=delta, risk=risk_hat, ucb=ucb, n=n, grid=grid, **meta)


def coverage_report(target, lower, upper, center, lam: float, alpha: float = 0.1, form: str = DEFAULT_FORM,
                    value_range: tuple[float, float] = MODEL_RANGE) -> dict[str, float]:
    """Held-out check of a calibration (test split): coverage and risk at ``lam`` in ``form``.

    Returns mean coverage (pixel-channel values inside the calibrated interval), mean
    risk, the fraction of images whose own risk is <= alpha, and the mean interval
    width (in the units of the arrays) of the interval clipped to ``value_range``,
    the valid range (clipping does not change which targets in that range are inside).
    """
    lo, hi = calibrated_interval(lower, upper, center, lam, form, value_range)
    r = np.atleast_1d(pixel_risk(target, lo, hi))
    return {
        "coverage": float(1.0 - r.mean()),
        "risk": float(r.mean()),
        "images_within_alpha": float(np.mean(r <= alpha)),
        "mean_width": clipped_width(lo, hi, value_range),
        "n": int(r.size),
        "lam": float(lam),
    }

# ----------------------------------------------------------------------------- interval sources

SOURCES = ("samples", "band", "bounds")
CENTERS = {"samples": "median", "band": "point", "bounds": "midpoint"}
DEFAULT_FORMS = {"samples": DEFAULT_FORM, "band": "centered", "bounds": "centered"}
BAND_STEP = 0.25     # grid step of the band's half-width c, in 0-255 grey levels
BAND_C_MAX = 255.0   # c = 255 covers every value


def band_grid(c_max: float = BAND_C_MAX, step: float = BAND_STEP) -> np.ndarray:
    """The half-widths c searched for a band: 0, ``step``, ..., ``c_max`` (0-255 grey levels)."""
    n = int(round(float(c_max) / step))
    if n < 1:
        raise ValueError(f"c_max must be at least {step}, got {c_max}")
    return np.arange(n + 1) * step


def grey_level(value_range: tuple[float, float] = MODEL_RANGE) -> float:
    """One 0-255 grey level in the units of ``value_range`` (2 / 255 in the model's [-1, 1])."""
    return (value_range[1] - value_range[0]) / 255.0


def band_interval(point, value_range: tuple[float, float] = MODEL_RANGE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trivial band's base interval: one grey level either side of ``point``, and ``point``.

    ``point`` (a regression output, or the mean of diffusion samples) is clipped
    into ``value_range``. In the centered form, lambda = c gives [p - c, p + c]
    with c in 0-255 grey levels: the constant band calibrated by the same RCPS.
    """
    a, b = value_range
    p = np.clip(np.asarray(point, np.float64), a, b)
    u = grey_level(value_range)
    return p - u, p + u, p


def bounds_interval(lower, upper) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A one-pass interval run's bounds, ordered per value, and their midpoint.

    Two quantile heads can cross; sorting them per value is the rearrangement of
    Chernozhukov, Fernandez-Val & Galichon 2010, which never worsens the quantile
    estimates. The midpoint is the centre the centered form scales around.
    """
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    if lo.shape != hi.shape:
        raise ValueError(f"lower and upper bounds differ in shape: {lo.shape} vs {hi.shape}")
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return lo, hi, 0.5 * (lo + hi)


@dataclass(frozen=True)
class IntervalSource:
    """Where the interval that lambda scales comes from, and how lambda scales it.

    * ``samples``: N diffusion samples (N, ...) -> per-value ``q_low``/``q_high``
      quantiles, scaled in ``form`` around the median (Sridhar et al. 2023);
    * ``band``: a point prediction -> [p - c, p + c], c = lambda in 0-255 grey
      levels (centered form only): the trivial constant band;
    * ``bounds``: a one-pass interval run's (lower, upper) -> scaled in ``form``
      around the midpoint (default centered: width x lambda, the run's width map
      keeps its shape; multiplicative as in Conffusion, Horwitz & Hoshen 2022).

    All three are calibrated by the same RCPS with the Hoeffding-Bentkus bound.
    ``form`` None: the kind's default; ``lambda_max`` None: 255 for bands, 10 otherwise.
    """

    kind: str = "samples"
    form: str | None = None
    q_low: float = 0.05
    q_high: float = 0.95
    lambda_max: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise ValueError(f"unknown interval source {self.kind!r} (choose from {', '.join(SOURCES)})")
        object.__setattr__(self, "form", check_form(self.form or DEFAULT_FORMS[self.kind]))
        if self.kind == "band" and self.form != "centered":
            raise ValueError("a band [p - c, p + c] is additive: its form is 'centered'")

    @classmethod
    def of(cls, cal: Calibration) -> IntervalSource:
        """The source a calibration was made with."""
        return cls(cal.source, cal.interval, cal.q_low or 0.05, cal.q_high or 0.95)

    @property
    def center(self) -> str:
        """What the interval is scaled around: "median", "point" or "midpoint"."""
        return CENTERS[self.kind]

    def lambdas(self) -> np.ndarray:
        """The grid RCPS searches for this source."""
        if self.kind == "band":
            return band_grid(self.lambda_max or BAND_C_MAX)
        return lambda_grid(self.lambda_max or DEFAULT_LAMBDA_MAX)

    def base(self, data, value_range: tuple[float, float] = MODEL_RANGE
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower, upper, center) at lambda = 1 from the source's data: samples (N, ...), a point (...),
        or a (lower, upper) pair."""
        if self.kind == "samples":
            return sample_quantiles(data, self.q_low, self.q_high)[:3]
        if self.kind == "band":
            return band_interval(data, value_range)
        lower, upper = data
        return bounds_interval(lower, upper)

    def record(self) -> dict[str, Any]:
        """What a Calibration of this source records about it."""
        quantiles = self.kind == "samples"
        return {"source": self.kind, "interval": self.form, "center": self.center,
                "q_low": self.q_low if quantiles else None, "q_high": self.q_high if quantiles else None}


def source_interval(cal: Calibration, data, value_range: tuple[float, float] = MODEL_RANGE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated (lower, upper) from a source's data (samples, point, or (lower, upper) of an interval run)."""
    lo, hi, c = IntervalSource.of(cal).base(data, value_range)
    return cal.apply(lo, hi, c, value_range)


def band_width_curve(point, c, value_range: tuple[float, float] = MODEL_RANGE) -> np.ndarray:
    """Mean width of [p - c, p + c] clipped to ``value_range`` at every half-width ``c`` (array units).

    Per value the clipped width is min(c, p - a) + min(c, b - p); with the 2M
    distances d sorted, sum_d min(c, d) = (sum of d <= c) + c * #(d > c): one sort,
    then a binary search per c.
    """
    a, b = value_range
    p = np.clip(np.asarray(point, np.float64), a, b).ravel()
    d = np.sort(np.concatenate([p - a, b - p]))
    cs = np.concatenate([[0.0], np.cumsum(d)])
    c = np.asarray(c, np.float64)
    k = np.searchsorted(d, c, side="right")
    return (cs[k] + c * (d.size - k)) / p.size


# ----------------------------------------------------------------------------- structure scale


def block_means(x, block: int) -> np.ndarray:
    """Means over non-overlapping ``block`` x ``block`` pixel blocks: (..., H, W) -> (..., H // block, W // block).

    Rows and columns past the last whole block (bottom, right) are dropped, so
    every block mean averages exactly ``block**2`` pixels. float32.
    """
    x = np.asarray(x)
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be at least 1 px, got {block}")
    if block == 1:
        return x.astype(np.float32, copy=False)
    h, w = x.shape[-2] // block, x.shape[-1] // block
    if h == 0 or w == 0:
        raise ValueError(f"{block} px blocks do not fit in {x.shape[-2]} x {x.shape[-1]} px")
    x = x[..., :h * block, :w * block].reshape(*x.shape[:-2], h, block, w, block)
    return x.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def scale_interval(block_data, cal: Calibration, value_range: tuple[float, float] = MODEL_RANGE
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated interval of block means at one structure scale.

    ``block_data``: the block means (``block_means``) at the scale's block size of
    what the scale's calibration (``CalibrationFile.scale``) was made from: N
    diffusion samples (N, ..., h, w, or any trailing layout) for source "samples",
    or an interval run's (lower, upper) pair for source "bounds" (the block mean of
    the bounds is the base interval of the block mean, scaled by lambda as calibrated).
    Returns (lower, upper) of the block means, float32, in ``value_range`` (pass
    (0, 255) for 0-255 block means).
    """
    if cal.source not in ("samples", "bounds"):
        raise ValueError(f"a scale calibration of source {cal.source!r} has no interval of its own to scale")
    lo, hi = source_interval(cal, block_data, value_range)
    return lo.astype(np.float32), hi.astype(np.float32)


# ----------------------------------------------------------------------------- generic calibration


class RiskTable:
    """Per-image risk curves of one interval source on its lambda grid, filled batch by batch.

    ``add`` takes a batch's targets (n, C, H, W) and the source's data; ``calibrate``
    runs RCPS on the whole table (``calibrate_lambda``). For bands the exact mean
    clipped width at every c is kept too, so ``report`` gives a held-out check
    (coverage and width at any c of the grid) without a second pass.
    """

    def __init__(self, source: IntervalSource, value_range: tuple[float, float] = MODEL_RANGE):
        self.source = source
        self.value_range = value_range
        self.lambdas = source.lambdas()
        self._risks: list[np.ndarray] = []
        self._widths: list[np.ndarray] = []
        self._raw_width = 0.0

    def add(self, target, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add a batch from the source's data; returns its base (lower, upper, center)."""
        lo, hi, c = self.source.base(data, self.value_range)
        self.add_base(target, lo, hi, c)
        return lo, hi, c

    def add_base(self, target, lower, upper, center) -> None:
        """Add a batch whose base interval (lambda = 1) is already computed."""
        target = np.asarray(target)
        self._risks.append(interval_risks(target, lower, upper, center, self.lambdas, self.source.form,
                                          self.value_range))
        self._raw_width += clipped_width(lower, upper, self.value_range) * len(target)
        if self.source.kind == "band":
            c = self.lambdas * grey_level(self.value_range)
            self._widths.append(np.stack([band_width_curve(center[i], c, self.value_range)
                                          for i in range(len(target))], axis=1))

    @property
    def n(self) -> int:
        return sum(r.shape[1] for r in self._risks)

    @property
    def table(self) -> np.ndarray:
        """(len(lambdas), n) per-image risks."""
        if not self._risks:
            return np.zeros((self.lambdas.size, 0))
        return np.concatenate(self._risks, axis=1)

    @property
    def raw_width(self) -> float:
        """Mean clipped width of the base interval (lambda = 1), array units."""
        return self._raw_width / max(self.n, 1)

    def calibrate(self, alpha: float = 0.1, delta: float = 0.1, *, hint: str | None = None,
                  **meta: Any) -> Calibration:
        """RCPS lambda of the table (``calibrate_lambda``); ``meta`` adds to the source's record."""
        return calibrate_lambda(self.table, self.lambdas, alpha, delta, hint=hint,
                                **{**self.source.record(), **meta})

    def _index(self, lam: float) -> int:
        k = int(np.argmin(np.abs(self.lambdas - lam)))
        if abs(self.lambdas[k] - lam) > 1e-9:
            raise ValueError(f"lambda {lam} is not on the grid")
        return k

    def report(self, lam: float, alpha: float = 0.1) -> dict[str, Any]:
        """Coverage, risk, images within alpha and (bands) mean clipped width at ``lam`` of the grid."""
        k = self._index(lam)
        r = self.table[k]
        width = float(np.concatenate(self._widths, axis=1)[k].mean()) if self._widths else None
        return {"coverage": float(1.0 - r.mean()), "risk": float(r.mean()),
                "images_within_alpha": float(np.mean(r <= alpha)), "mean_width": width,
                "n": int(r.size), "lam": float(self.lambdas[k])}

    def lambda_for_coverage(self, target_coverage: float) -> float | None:
        """Smallest lambda of the grid whose mean coverage on the table is >= ``target_coverage``."""
        ok = np.flatnonzero(1.0 - self.table.mean(axis=1) >= target_coverage - 1e-12)
        return None if ok.size == 0 else float(self.lambdas[ok.min()])


def calibrate_intervals(lower, upper, target, *, form: str = "centered", alpha: float = 0.1, delta: float = 0.1,
                        lambda_max: float = DEFAULT_LAMBDA_MAX, value_range: tuple[float, float] = MODEL_RANGE,
                        hint: str | None = None, **meta: Any) -> Calibration:
    """RCPS calibration of a one-pass interval run's bounds (n, C, H, W) against ``target``.

    lambda scales [lower, upper] around its midpoint (``form="centered"``:
    [m - lambda (m - l), m + lambda (u - m)], the width times lambda) or
    multiplicatively (Conffusion's [l / lambda, u lambda] on [0, 1]); the same
    Hoeffding-Bentkus RCPS as for samples (Bates et al. 2021).
    """
    table = RiskTable(IntervalSource("bounds", form, lambda_max=lambda_max), value_range)
    table.add(target, (lower, upper))
    return table.calibrate(alpha, delta, hint=hint, **meta)


def calibrate_band(point, target, *, alpha: float = 0.1, delta: float = 0.1, c_max: float = BAND_C_MAX,
                   value_range: tuple[float, float] = MODEL_RANGE, **meta: Any) -> Calibration:
    """The trivial constant band [p - c, p + c] around a point prediction, c (0-255 levels) by the same RCPS."""
    table = RiskTable(IntervalSource("band", lambda_max=c_max), value_range)
    table.add(target, point)
    return table.calibrate(alpha, delta, **meta)


def calibrate_samples(samples, target, *, form: str = DEFAULT_FORM, q_low: float = 0.05, q_high: float = 0.95,
                      alpha: float = 0.1, delta: float = 0.1, lambda_max: float = DEFAULT_LAMBDA_MAX, block: int = 1,
                      value_range: tuple[float, float] = MODEL_RANGE, **meta: Any) -> Calibration:
    """lambda of the quantile interval of N samples (N, n, C, H, W), per value or of ``block`` px block means."""
    samples, target = np.asarray(samples), np.asarray(target)
    table = RiskTable(IntervalSource("samples", form, q_low, q_high, lambda_max), value_range)
    table.add(block_means(target, block), block_means(samples, block))
    unit = "pixel-channel" if block == 1 else "block-channel"
    return table.calibrate(alpha, delta, samples=samples.shape[0], risk_unit=unit, **meta)


__all__ = [
    "FORMS", "DEFAULT_FORM", "check_form", "multiplicative_interval", "calibrated_interval",
    "sample_quantiles", "scaled_interval", "IntervalMaps", "credible_interval", "pixel_risk",
    "coverage", "required_lambda", "image_risk_curve", "interval_risks", "hb_pvalue", "hb_ucb",
    "Calibration", "calibrate_lambda", "coverage_report", "DEFAULT_LAMBDAS", "DEFAULT_LAMBDA_MAX", "lambda_grid",
    "clipped_width", "SOURCES", "IntervalSource", "RiskTable", "band_grid", "band_interval", "bounds_interval",
    "band_width_curve", "source_interval", "block_means", "scale_interval", "calibrate_intervals", "calibrate_band",
    "calibrate_samples", "grey_level",
]
