"""The noise check of ``vstain score``: can a metric be gamed by adding noise?

A blurry regression output plus Gaussian noise is sharper, but it is not a better
stain. If that pseudo-model scores better than the diffusion model on a metric, the
metric rewards sharpness rather than fidelity. The check scores "regression +
N(0, sd^2)" (0-255 units, fixed seed, rounded and clipped) on FSD, PFD, L1 and L2
next to the models, and says whether it looks better than diffusion on each.
A metric passes ("noise-proof") when the noisy regression does not have a lower
(better) point estimate than diffusion. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vstain_cli import seeding

#: Standard deviation of the added noise, in 0-255 grey levels (enough to make a blurry regression output look sharp).
NOISE_SD = 16.0
#: Metrics the check compares (lower is better for all of them).
CHECKED = ("FSD", "PFD", "L1", "L2")


def noisy_tiles(tiles: np.ndarray, sd: float = NOISE_SD, seed: int = 0) -> np.ndarray:
    """uint8 tiles + N(0, sd^2) per pixel and channel, rounded and clipped to 0-255 (seeded)."""
    rng = seeding.numpy_rng(seeding.derive_seed(seed, seeding.SCORE_NOISE))
    noise = rng.normal(0.0, sd, np.shape(tiles))
    return np.clip(np.rint(np.asarray(tiles, np.float64) + noise), 0, 255).astype(np.uint8)


def verdict(models: Mapping[str, Mapping[str, Any]], noisy: Mapping[str, Any], base: str, against: str,
            sd: float = NOISE_SD) -> dict[str, Any]:
    """The check's record: the noisy pseudo-model's metrics next to ``base`` (regression) and ``against``.

    ``looks_better[m]``: the noisy regression's value is below diffusion's on metric m;
    ``disjoint[m]``: and their 95 % intervals do not overlap. ``noise_proof`` is the
    verdict on PFD (None when PFD was not scored), ``fsd_noise_proof`` on FSD.
    """
    mine = {k: v for k, v in noisy.get("metrics", {}).items() if k in CHECKED}
    theirs = models[against]["metrics"]
    looks, disjoint = {}, {}
    for k, m in mine.items():
        d = theirs.get(k)
        if not d or m.get("value") is None or d.get("value") is None:
            continue
        looks[k] = bool(m["value"] < d["value"])
        hi, lo = m.get("hi"), d.get("lo")
        disjoint[k] = bool(looks[k] and hi is not None and lo is not None and np.isfinite(hi) and hi < lo)
    return {
        "name": f"{base} + N(0, {sd:g})", "base": base, "against": against, "sd": float(sd),
        "metrics": mine, "intervals": noisy.get("intervals"),
        "base_metrics": {k: v for k, v in models[base]["metrics"].items() if k in CHECKED},
        "against_metrics": {k: v for k, v in theirs.items() if k in CHECKED},
        "looks_better": looks, "disjoint": disjoint,
        "noise_proof": None if "PFD" not in looks else not looks["PFD"],
        "fsd_noise_proof": None if "FSD" not in looks else not looks["FSD"],
    }


def sentence(rec: Mapping[str, Any]) -> str:
    """One line saying what the check found (report and console)."""
    name, against = rec["name"], rec["against"]

    def say(metric: str) -> str:
        m, d = rec["metrics"].get(metric), rec["against_metrics"].get(metric)
        if not m or not d:
            return f"{metric} not scored"
        if rec["looks_better"].get(metric):
            how = " (intervals disjoint)" if rec["disjoint"].get(metric) else " (intervals overlap)"
            return (f"{metric}: {name} {m['value']:.4g} looks BETTER than {against} {d['value']:.4g}{how}: "
                    f"{metric} is not noise-proof here")
        return f"{metric}: {name} {m['value']:.4g} does not beat {against} {d['value']:.4g}: noise-proof here"

    return "; ".join(say(k) for k in ("PFD", "FSD"))


__all__ = ["NOISE_SD", "CHECKED", "noisy_tiles", "verdict", "sentence"]
