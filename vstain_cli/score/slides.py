"""Slide-level evidence of ``vstain score``: grade agreement and the per-slide table.

Sridhar et al. 2023 train StainNet to tell a liver slide's steatosis grade from one
H&E patch; the clinical question for a virtual stain is whether that grade survives
the staining. ``grade_agreement`` compares StainNet's accuracy on a model's tiles
with its accuracy on the real tiles of the same slides, per tile and per slide
(majority vote of the slide's tile predictions), with slide-level (cluster
bootstrap) intervals. ``per_slide_table`` breaks every metric down by test slide.
Definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vstain_cli.score import metrics


def majority_vote(pred: np.ndarray, codes: np.ndarray, n_slides: int, n_classes: int) -> np.ndarray:
    """Each slide's most frequent tile prediction (S,); a tie goes to the lowest grade among the tied."""
    counts = np.zeros((n_slides, n_classes), np.int64)
    np.add.at(counts, (codes, np.asarray(pred, np.int64)), 1)
    return counts.argmax(axis=1)


def _ratio_ci(num: np.ndarray, den: np.ndarray, est: float | None, n_slides: int,
              level: float) -> dict[str, float | None]:
    """{value, lo, hi} of a ratio of two resampled accuracies (resamples with a zero denominator dropped)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r = r[np.isfinite(r)]
    if est is None or r.size < 2:
        return {"value": est, "lo": None, "hi": None}
    lo, hi = metrics.cluster_interval(est, r, n_slides, level)
    return {"value": est, "lo": lo, "hi": hi}


def _mean_ci(est: float, boot: np.ndarray, n_slides: int, level: float) -> dict[str, float]:
    """{value, lo, hi} of a fraction: the widened percentile interval, kept within [0, 1]."""
    lo, hi = metrics.cluster_interval(est, boot, n_slides, level)
    return {"value": est, "lo": float(np.clip(lo, 0.0, 1.0)), "hi": float(np.clip(hi, 0.0, 1.0))}


def grade_agreement(labels: np.ndarray, groups: list[str] | np.ndarray, real_pred: np.ndarray,
                    fake_pred: np.ndarray, n_classes: int, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """StainNet's grade accuracy on a model's tiles vs on the real tiles of the same slides.

    ``labels``: the slide grade of each tile; ``groups``: its slide id; predictions
    on the real tile and on the model's tile paired with it. Returns, each with a
    slide-level 95 % interval ({value, lo, hi}; the same slide draws for all):

    * ``tile_accuracy`` / ``real_tile_accuracy``: fraction of tiles whose grade is right;
    * ``tile_ratio``: tile_accuracy / real_tile_accuracy (1 = the stain keeps all the grade
      information StainNet finds in real H&E);
    * ``slide_accuracy`` / ``real_slide_accuracy`` / ``slide_ratio``: the same for slides,
      a slide's grade being the majority vote of its tiles;
    * ``tile_agreement``: fraction of tiles given the same grade as their real pair;
    * ``slides``, ``slides_correct``, ``real_slides_correct``, ``tiles``.
    """
    labels, real_pred, fake_pred = (np.asarray(a, np.int64) for a in (labels, real_pred, fake_pred))
    codes, s = metrics.cluster_codes(groups)
    w = metrics.cluster_weights(s, n_boot, seed)
    real_ok, fake_ok = (real_pred == labels).astype(float), (fake_pred == labels).astype(float)
    same = (real_pred == fake_pred).astype(float)
    boot_real, boot_fake = metrics.cluster_means(real_ok, codes, w), metrics.cluster_means(fake_ok, codes, w)
    acc_real, acc_fake = float(real_ok.mean()), float(fake_ok.mean())

    slide_label = np.zeros(s, np.int64)
    slide_label[codes] = labels  # a slide's tiles share its label
    vote_real = majority_vote(real_pred, codes, s, n_classes)
    vote_fake = majority_vote(fake_pred, codes, s, n_classes)
    s_real, s_fake = (vote_real == slide_label).astype(float), (vote_fake == slide_label).astype(float)
    sboot_real, sboot_fake = (w @ s_real) / s, (w @ s_fake) / s
    sacc_real, sacc_fake = float(s_real.mean()), float(s_fake.mean())
    return {
        "tiles": int(len(labels)), "slides": s,
        "tile_accuracy": _mean_ci(acc_fake, boot_fake, s, level),
        "real_tile_accuracy": _mean_ci(acc_real, boot_real, s, level),
        "tile_ratio": _ratio_ci(boot_fake, boot_real, acc_fake / acc_real if acc_real > 0 else None, s, level),
        "slide_accuracy": _mean_ci(sacc_fake, sboot_fake, s, level),
        "real_slide_accuracy": _mean_ci(sacc_real, sboot_real, s, level),
        "slide_ratio": _ratio_ci(sboot_fake, sboot_real, sacc_fake / sacc_real if sacc_real > 0 else None, s,
                                 level),
        "slides_correct": int(s_fake.sum()), "real_slides_correct": int(s_real.sum()),
        "tile_agreement": _mean_ci(float(same.mean()), metrics.cluster_means(same, codes, w), s, level),
    }


def per_slide_table(groups: list[str] | np.ndarray, labels: np.ndarray | None,
                    per_image: Mapping[str, Mapping[str, np.ndarray]],
                    features: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                    real_pred: np.ndarray | None = None, fake_pred: Mapping[str, np.ndarray] | None = None,
                    n_classes: int | None = None) -> list[dict[str, Any]]:
    """One record per slide: {slide, label, tiles, real_accuracy, real_vote, models: {name: metrics}}.

    Per paired model (``per_image``): mean L1, L2 and PFD over the slide's tiles,
    FSD (``features["FSD"]``: the Fréchet distance between the slide's real and
    generated tiles, biased upward at a slide's few tiles: compare models on the
    same slide only), StainNet's accuracy on the slide's generated tiles and their
    majority vote. Accuracies need ``labels`` and predictions.
    """
    codes, s = metrics.cluster_codes(groups)
    ids = np.unique(np.asarray(groups, dtype=object).astype(str))
    fsd = (features or {}).get("FSD")
    fake_pred = fake_pred or {}
    have_pred = labels is not None and real_pred is not None and n_classes is not None
    table = []
    for c in range(s):
        rows = np.flatnonzero(codes == c)
        rec: dict[str, Any] = {"slide": str(ids[c]), "label": None if labels is None else int(labels[rows[0]]),
                               "tiles": int(len(rows))}
        if have_pred:
            rec["real_accuracy"] = float((real_pred[rows] == labels[rows]).mean())
            rec["real_vote"] = int(majority_vote(real_pred[rows], np.zeros(len(rows), np.int64), 1, n_classes)[0])
        models: dict[str, Any] = {}
        for name, vals in per_image.items():
            m: dict[str, Any] = {k: float(np.mean(vals[k][rows])) for k in ("L1", "L2", "PFD") if k in vals}
            if fsd is not None and name in fsd:
                m["FSD"] = metrics.fd_value(fsd["real"][rows], fsd[name][rows]) if len(rows) >= 2 else None
            if have_pred and name in fake_pred:
                p = fake_pred[name][rows]
                m["accuracy"] = float((p == labels[rows]).mean())
                m["vote"] = int(majority_vote(p, np.zeros(len(rows), np.int64), 1, n_classes)[0])
            models[name] = m
        rec["models"] = models
        table.append(rec)
    return table


__all__ = ["majority_vote", "grade_agreement", "per_slide_table"]
