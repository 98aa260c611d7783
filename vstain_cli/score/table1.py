"""Does a score reproduce the shape of the paper's Table 1?

Sridhar et al. 2023, Table 1: regression is best on L1 and L2 but worst on FSD,
pix2pix lies between, and the diffusion models are best on FSD (624.8 / 54.1 /
4.5). Each claim here holds only when the 95 % intervals of the two models
compared do not overlap; otherwise it is reported as not shown, with the numbers.
"""

from __future__ import annotations

from typing import Any

ROLES = ("diffusion", "regression", "pix2pix")


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
    text = (f"{a} {ma['value']:.4g} [{ma['lo']:.4g}, {ma['hi']:.4g}] vs "
            f"{b} {mb['value']:.4g} [{mb['lo']:.4g}, {mb['hi']:.4g}]")
    return bool(ma["hi"] < mb["lo"]), text


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
    return {"roles": roles, "claims": claims, "reproduced": all(c["holds"] for c in claims)}
