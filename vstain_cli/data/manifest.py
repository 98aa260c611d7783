"""``pairs.csv``: the slide pairs to tile, and the split by slide."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from vstain_cli import seeding
from vstain_cli.errors import InputError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.5, 0.2, 0.3)
MAX_LABEL = 3
REQUIRED = ("slide_id", "af", "he", "label")


@dataclass(frozen=True)
class SlidePair:
    """One row of pairs.csv with paths resolved against the CSV's folder."""

    slide_id: str
    af: Path
    he: Path
    label: int
    split: str | None
    registration: Path | None = None  # optional: AF -> H&E registration JSON (``vstain register``)


def read_pairs(path: str | Path, max_label: int = MAX_LABEL) -> list[SlidePair]:
    """Parse and validate ``pairs.csv``; every problem names the file (and row)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not a CSV text file", path) from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path) from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError("empty pairs file (expected a header: slide_id,af,he,label[,split])", path)
    reader = csv.DictReader(lines)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)} (expected slide_id,af,he,label[,split])", path)
    has_split = "split" in header
    pairs: list[SlidePair] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            raise InputError(f"line {lineno}: more fields than columns", path)
        sid = row.get("slide_id", "")
        if not sid:
            raise InputError(f"line {lineno}: empty slide_id", path)
        if any(ch in sid for ch in "/\\") or sid in (".", ".."):
            raise InputError(f"line {lineno}: slide_id {sid!r} may not contain path separators", path)
        if sid in seen:
            raise InputError(f"line {lineno}: duplicate slide_id {sid!r}", path)
        seen.add(sid)
        try:
            label = int(row["label"])
        except ValueError:
            raise InputError(f"line {lineno}: label {row['label']!r} is not an integer", path) from None
        if not 0 <= label <= max_label:
            raise InputError(f"line {lineno}: label {label} out of range 0-{max_label}", path)
        split = row.get("split") or None if has_split else None
        if split is not None and split not in SPLITS:
            raise InputError(f"line {lineno}: split {split!r} is not one of {', '.join(SPLITS)}", path)
        if not row["af"] or not row["he"]:
            raise InputError(f"line {lineno}: empty af or he path", path)
        reg = (path.parent / row["registration"]).resolve() if row.get("registration") else None
        pairs.append(SlidePair(sid, (path.parent / row["af"]).resolve(), (path.parent / row["he"]).resolve(), label, split,
                               reg))
    if not pairs:
        raise InputError("no slide pairs (only a header)", path)
    given = [p.split is not None for p in pairs]
    if any(given) and not all(given):
        raise InputError("the split column is filled for some rows but not all", path)
    return pairs


def assign_splits(
    pairs: list[SlidePair], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, str]:
    """slide_id -> split, by slide, stratified by label, in ratio ``fractions``.

    Slides are ordered by label (shuffled within a label with ``seed``) and dealt
    in turn to the split furthest below its target share, so every label is
    spread over the splits in proportion and the totals match the ratio as
    closely as whole slides allow. A ``split`` given in pairs.csv wins.
    """
    if all(p.split for p in pairs):
        return {p.slide_id: p.split for p in pairs}  # type: ignore[misc]
    rng = seeding.numpy_rng(seed)
    by_label: dict[int, list[str]] = {}
    for p in sorted(pairs, key=lambda p: p.slide_id):
        by_label.setdefault(p.label, []).append(p.slide_id)
    order: list[str] = []
    for label in sorted(by_label):
        ids = by_label[label]
        order.extend(ids[i] for i in rng.permutation(len(ids)))
    counts = dict.fromkeys(SPLITS, 0)
    out: dict[str, str] = {}
    frac = dict(zip(SPLITS, fractions))
    for i, sid in enumerate(order, start=1):
        deficit = {s: frac[s] * i - counts[s] for s in SPLITS}
        best = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
        counts[best] += 1
        out[sid] = best
    return out
