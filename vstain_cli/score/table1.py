"""Does a score reproduce the shape of the paper's Table 1?

Sridhar et al. 2023, Table 1: regression is best on L1 and L2 but worst on FSD,
pix2pix lies between, and the diffusion models are best on FSD (624.8 / 54.1 /
4.5). Each claim here holds only when the 95 % intervals of the two models
compared do not overlap; otherwise it is reported as not shown, with the numbers.
The intervals are those of score.json: slide-level (slides resampled, the cluster
bootstrap of ``vstain_cli.score.metrics``) whenever the tiles' slides are known;
``intervals`` in the result says which.

Beyond Table 1, ``evidence`` lists the further checks, outside the verdict: diffusion
best on the paired feature distance (PFD), and diffusion keeping the steatosis grade
(StainNet's tile accuracy on its tiles at least ``GRADE_KEPT`` of that on the real
tiles, as the lower end of the slide-level interval of the ratio).
"""

from __future__ import annotations

from typing import Any

ROLES = ("diffusion", "regression", "pix2pix")
#: Grade accuracy on generated tiles, as a fraction of that on real tiles, that counts as "grade kept".
GRADE_KEPT = 0.8


def find_roles(models: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Map diffusion/regression/pix2pix to the score's model names (by recorded kind, else by name)."""
    roles: dict[str, str] = {}
    for name, entry in models.items():
        kind = entry.get("kind") or next((r for r in ROLES if r in name.lower()), None)
        if kind in ROLES and kind not in roles:
            roles[kind] = name
    return roles


def _better(models: dict, a: str, b: str, metric: str) -> tuple[bool, str]:
    """Is ``a`` better than ``b`` on ``metric`` (lower is better) with disjoint intervals?"""
    ma, mb = models[a]["metrics"].get(metric), models[b]["metrics"].get(metric)
    if not ma or not mb:
        return False, f"{metric} missing"
    g = lambda x: "?" if x is None else f"{x:.4g}"  # noqa: E731 - None: no interval (score.json's null)
    text = (f"{a} {g(ma['value'])} [{g(ma['lo'])}, {g(ma['hi'])}] vs "
            f"{b} {g(mb['value'])} [{g(mb['lo'])}, {g(mb['hi'])}]")
    hi, lo = ma.get("hi"), mb.get("lo")
    return bool(hi is not None and lo is not None and hi < lo), text


def table1_shape(score: dict[str, Any]) -> dict[str, Any] | None:
    """The claims of Table 1's shape, each with ``holds`` and its numbers; None without all three roles."""
    models = score.get("models", {})
    roles = find_roles(models)
    if set(roles) != set(ROLES):
        return None
    d, r, p = roles["diffusion"], roles["regression"], roles["pix2pix"]
    checks = [
        ("diffusion best on FSD (vs pix2pix)", d, p, "FSD"),
        ("pix2pix better than regression on FSD", p, r, "FSD"),
        ("regression best on L1 (vs pix2pix)", r, p, "L1"),
        ("regression best on L1 (vs diffusion)", r, d, "L1"),
        ("regression best on L2 (vs pix2pix)", r, p, "L2"),
        ("regression best on L2 (vs diffusion)", r, d, "L2"),
    ]
    claims = []
    for claim, a, b, metric in checks:
        holds, numbers = _better(models, a, b, metric)
        claims.append({"claim": claim, "holds": holds, "numbers": numbers})
    evidence = []
    if "PFD" in models[d]["metrics"]:
        for other in (r, p):
            holds, numbers = _better(models, d, other, "PFD")
            evidence.append({"claim": f"diffusion best on PFD (vs {other})", "holds": holds, "numbers": numbers})
    grade = models[d].get("grade")
    if grade and grade.get("tile_ratio", {}).get("value") is not None:
        ratio = grade["tile_ratio"]
        lo = ratio.get("lo")
        evidence.append({
            "claim": f"diffusion keeps the grade (tile accuracy >= {GRADE_KEPT:g} x real, lower 95% end)",
            "holds": bool(lo is not None and lo >= GRADE_KEPT),
            "numbers": (f"{d} {grade['tile_accuracy']['value']:.3f} vs real {grade['real_tile_accuracy']['value']:.3f}"
                        f", ratio {ratio['value']:.3f} [{'?' if lo is None else f'{lo:.3f}'}, "
                        f"{'?' if ratio.get('hi') is None else format(ratio['hi'], '.3f')}]"),
        })
    level = score.get("settings", {}).get("intervals")
    return {"roles": roles, "claims": claims, "reproduced": all(c["holds"] for c in claims),
            "intervals": level, "evidence": evidence}
