"""``vstain register``: a registration JSON and a quality picture per slide pair, and a new pairs.csv.

Per pair ``<id>.registration.json`` (format ``vstain-registration``: the
AF -> H&E transform — affine plus residual grid — per-node confidence and
validity, the fingerprints of both slides, provenance) and
``<id>.registration.png`` (residual shift magnitude as a heat map over the
registered H&E thumbnail; unmeasured nodes stay grey). ``pairs.csv`` in the
output folder repeats the input rows with paths made relative to it and a
``registration`` column.

A pair whose registration is below the quality bar (``registration.quality``)
is *failed*: its JSON (``quality.passed: false``, the numbers and reasons) and
picture are written for inspection, but it is kept out of ``pairs.csv`` and
``load_registration`` refuses it. If every pair fails, nothing else is written
and an ``InputError`` names the H&E file(s) and the reasons.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vstain_cli.data.manifest import SlidePair, read_pairs
from vstain_cli.data.registration import FORMAT, FORMAT_VERSION, RegisterOptions, Registration, estimate
from vstain_cli.data.warp import Transform, transform_from_dict, transform_to_dict, warp_view
from vstain_cli.errors import InputError, input_errors
from vstain_cli.io.images import colormap, write_png
from vstain_cli.io.slides import open_af, open_he
from vstain_cli.progress import NullProgress, Progress
from vstain_cli.provenance import atomic_output, check_output_file, fingerprint, record, write_json


def registration_record(pair: SlidePair, reg: Registration, af_size, he_size, options: RegisterOptions) -> dict:
    """The JSON record of one pair's registration."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "slide_id": pair.slide_id,
        "mpp": reg.mpp, "af_size": list(af_size), "he_size": list(he_size),
        "af": fingerprint(pair.af), "he": fingerprint(pair.he),
        "transform": transform_to_dict(reg.transform),
        "confidence": reg.confidence.tolist(), "valid": reg.valid.astype(int).tolist(),
        "stats": reg.stats, "quality": reg.quality,
        **record({"register": asdict(options)}),
    }


def load_registration(path: str | Path, pair: SlidePair | None = None) -> Transform:
    """The transform of a registration (or ground-truth) JSON; InputError naming the file if unusable.

    With ``pair``, the recorded slide fingerprints must match its files. A record
    whose ``quality`` did not pass is refused (truth files carry no ``quality``).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("registration file not found", path) from None
    except (OSError, ValueError) as e:
        raise InputError(f"not a registration JSON ({e})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} record", path)
    if pair is not None:
        for key, src in (("af", pair.af), ("he", pair.he)):
            rec = obj.get(key)
            if isinstance(rec, dict) and rec.get("sha256_head_tail") != fingerprint(src)["sha256_head_tail"]:
                raise InputError(f"was made for another {key.upper()} slide than {src.name}; rerun vstain register", path)
    q = obj.get("quality")
    if isinstance(q, dict) and not q.get("passed", False):
        why = "; ".join(q.get("reasons") or []) or "no reason recorded"
        raise InputError(f"this registration failed the quality bar ({why}); it is never used: "
                         "check the pair, or rerun vstain register with other options", path)
    try:
        return transform_from_dict(obj["transform"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"malformed transform ({e})", path) from None


def quality_picture(af_reader, he_reader, reg: Registration, max_size: int = 768) -> np.ndarray:
    """Residual shift (µm) as a heat map blended over the registered H&E thumbnail, (h, w, 3) uint8."""
    t = reg.transform
    af_thumb, ds_a = af_reader.thumbnail(max_size, channel_sum=True)
    he_thumb, ds_h = he_reader.thumbnail(int(max_size * max(he_reader.width, he_reader.height)
                                             / max(af_reader.width, af_reader.height)) + 1)
    shape = af_thumb.shape[:2]
    he = warp_view(he_thumb.astype(np.float32), t.scaled(ds_a, ds_h), shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] * ds_a + (ds_a - 1) / 2
    ddx, ddy = t.displacement(xx, yy)
    mag = np.hypot(ddx, ddy) * reg.mpp
    heat = colormap(mag, 0.0, max(5.0, float(np.nanmax(mag)) if mag.size else 5.0)).transpose(1, 2, 0)
    # nodes not measured: grey, so filled-in values are not mistaken for measurements
    gi = np.clip(np.rint((yy - t.origin[1]) / t.step).astype(int), 0, reg.valid.shape[0] - 1)
    gj = np.clip(np.rint((xx - t.origin[0]) / t.step).astype(int), 0, reg.valid.shape[1] - 1)
    heat = np.where(reg.valid[gi, gj][..., None], heat, 128)
    out = 0.55 * he[..., :3] + 0.45 * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _rel(path: Path, folder: Path) -> str:
    return os.path.relpath(path, folder.resolve())


@dataclass
class RegisterResult:
    """What ``register_pairs`` wrote: the new pairs.csv, the ids kept in it, and the failed pairs."""

    pairs_csv: Path
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # slide id -> one line: H&E file and reasons


def register_pairs(
    pairs_csv: str | Path, out: str | Path, options: RegisterOptions | None = None, *,
    mpp: float | None = None, force: bool = False, progress: Progress | None = None,
) -> RegisterResult:
    """Register every pair of ``pairs_csv`` into folder ``out``.

    Pairs below the quality bar are kept out of the new pairs.csv and warned
    about (one line each); if none passes, InputError and no pairs.csv.
    """
    options = options or RegisterOptions()
    with input_errors():
        options.check()
    progress = progress or NullProgress()
    out = Path(out)
    pairs = read_pairs(pairs_csv)
    new_csv = out / "pairs.csv"
    if new_csv.resolve() == Path(pairs_csv).resolve():
        raise InputError("--out is the folder of the input pairs.csv; choose another folder", out)
    check_output_file(new_csv, force)
    progress.start("slides", "register", len(pairs))
    rows, failed, why = [], {}, {}
    for p in pairs:
        with open_af(p.af) as af, open_he(p.he) as he:
            m_af = af.mpp or he.mpp or mpp
            m_he = he.mpp or af.mpp or mpp
            if mpp is not None:
                m_af = m_he = mpp
            if m_af is None:
                raise InputError("slide has no pixel size; pass --mpp", p.af)
            with input_errors(p.af):
                reg = estimate(af, he, m_af, m_he, options, progress, key=p.slide_id)
            rec = registration_record(p, reg, (af.width, af.height), (he.width, he.height), options)
            write_json(out / f"{p.slide_id}.registration.json", rec)
            write_png(out / f"{p.slide_id}.registration.png", quality_picture(af, he, reg))
        progress.advance("slides")
        if not reg.passed:
            why[p.slide_id] = (p.he, "; ".join(reg.quality["reasons"]))
            failed[p.slide_id] = f"{p.he}: registration failed: {why[p.slide_id][1]}"
            continue
        rows.append([p.slide_id, _rel(p.af, out), _rel(p.he, out), p.label, p.split or "",
                     f"{p.slide_id}.registration.json"])
    progress.finish("slides")
    if not rows:  # one line naming the H&E file(s) and the reasons; the JSONs stay for inspection
        if len(why) == 1:
            sid, (he_path, reason) = next(iter(why.items()))
            raise InputError(f"registration failed: {reason} (numbers in {out / f'{sid}.registration.json'}); "
                             "no pairs.csv written", he_path)
        raise InputError(f"registration failed for all {len(why)} pairs, no pairs.csv written "
                         f"(numbers in {out}/*.registration.json): "
                         + " | ".join(f"{h.name}: {r}" for h, r in why.values()), pairs_csv)
    for sid, line in failed.items():
        progress.warn(f"{line}; kept out of pairs.csv (numbers in {sid}.registration.json)")
    with atomic_output(new_csv) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            has_split = any(p.split for p in pairs)
            w.writerow(["slide_id", "af", "he", "label", *(["split"] if has_split else []), "registration"])
            for r in rows:
                w.writerow(r[:4] + ([r[4]] if has_split else []) + [r[5]])
    return RegisterResult(new_csv, [r[0] for r in rows], failed)
