"""The self-contained HTML report of ``vstain score`` and the metric display rules.

``write_report`` embeds every image as a base64 PNG (nothing is fetched), so a
report can be mailed or archived as one file. Table rules (column order, the
direction of better, decimals) live here and are shared with the CLI's table.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: Column order of the report/CLI table (the paper's Table 1, PFD, PSNR/SSIM).
METRIC_ORDER = ("FID", "FSD", "PFD", "L1", "L2", "PSNR", "SSIM")
#: True when larger is better.
HIGHER_IS_BETTER = {"FID": False, "FSD": False, "PFD": False, "L1": False, "L2": False, "PSNR": True, "SSIM": True}


def json_ready(obj: Any) -> Any:
    """Results without numpy arrays (``per_image``, ``features`` dropped), non-finite floats -> None."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items() if k not in ("per_image", "features")}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def format_interval(m: Mapping[str, float] | None, digits: int = 1) -> str:
    """``value [lo, hi]`` with ``digits`` decimals; '-' when absent."""
    if not m:
        return "-"

    v = m["value"]
    # Small nonzero values (e.g. FD on a weak feature net) keep 3 significant digits.
    tiny = v is not None and math.isfinite(v) and v != 0 and abs(v) < 0.5 * 10**-digits

    def f(x: float | None) -> str:
        if x is None or not math.isfinite(x):
            return "inf"
        return f"{x:.3g}" if tiny else f"{x:.{digits}f}"

    return f"{f(m['value'])} [{f(m['lo'])}, {f(m['hi'])}]"


#: Decimals per metric in tables.
DIGITS = {"FID": 1, "FSD": 1, "PFD": 2, "L1": 1, "L2": 1, "PSNR": 2, "SSIM": 3}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}
table.metrics{border-collapse:collapse;font-size:14px}
table.metrics th,table.metrics td{padding:6px 12px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics thead th{border-bottom:2px solid #999}
td .ci{color:#777;font-size:12px} td.best{font-weight:700;background:#eef6ee}
table.grid{border-collapse:collapse} table.grid th{font-size:13px;font-weight:600;padding:2px 4px;text-align:center}
table.grid td{padding:2px} table.grid td.rowname{font-size:11px;color:#777;text-align:right;padding-right:6px}
table.grid img{display:block;width:128px;height:128px;image-rendering:pixelated}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 10px;margin:4px 0;font-size:13px}
.legend{font-size:11px;color:#555;display:flex;align-items:center;gap:4px;justify-content:center}
.legend img{width:80px!important;height:10px!important}
.note{font-size:12px;color:#666;max-width:900px}
table.settings td{text-align:left!important;font-size:12px;padding:3px 12px}
pre.note{white-space:pre-wrap}
"""


def sampling_label(rec: Mapping[str, Any] | None) -> str:
    """How a model's tiles were sampled, e.g. "DDIM-50, eta 0"; "-" for given tiles and one-pass models."""
    from vstain_cli.diffusion.samplers import protocol_label

    return protocol_label(rec) if rec else "-"


def _metrics_table(results: Mapping[str, Any]) -> str:
    models = results.get("models", {})
    sampled = any(r.get("sampling") for r in models.values())
    cols = [m for m in METRIC_ORDER if any(m in r["metrics"] for r in models.values())]
    best: dict[str, float] = {}
    for c in cols:
        vals = [r["metrics"][c]["value"] for r in models.values() if c in r["metrics"]]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if vals:
            best[c] = max(vals) if HIGHER_IS_BETTER[c] else min(vals)
    arrow = {c: "&uarr;" if HIGHER_IS_BETTER[c] else "&darr;" for c in cols}
    head = "".join(f"<th>{c} {arrow[c]}</th>" for c in cols)
    rows = []
    for name, r in models.items():
        cells = [f"<td>{html.escape(name)}</td>"]
        for c in cols:
            m = r["metrics"].get(c)
            if not m:
                cells.append("<td>&ndash;</td>")
                continue
            d = DIGITS[c]
            txt = format_interval(m, d)
            val, ci = txt.split(" ", 1)
            cls = ' class="best"' if len(models) > 1 and m["value"] == best.get(c) else ""
            cells.append(f"<td{cls}>{val} <span class=ci>{ci}</span></td>")
        cells.append(f"<td>{r['n']}{'' if r['paired'] else ' (unpaired)'}</td>")
        if sampled:
            cells.append(f"<td>{html.escape(sampling_label(r.get('sampling')))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="metrics"><thead><tr><th>model</th>{head}<th>tiles</th>'
        f'{"<th>sampling</th>" if sampled else ""}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _image_table(columns: Mapping[str, np.ndarray], row_names: list[str] | None = None) -> str:
    """Columns of (K, 3, H, W) uint8 images, or (K, H, W) scalar maps (viridis, shared scale)."""
    from vstain_cli.io import images as viz

    cols: dict[str, list[str]] = {}
    legends: dict[str, str] = {}
    k = None
    for title, arr in columns.items():
        a = np.asarray(arr)
        if a.ndim == 3:  # scalar maps -> viridis with one scale per column
            finite = a[np.isfinite(a)]
            vmin = float(np.percentile(finite, 1)) if finite.size else 0.0
            if finite.size and finite.min() >= 0:
                vmin = 0.0  # magnitudes (interval widths): the scale starts at zero
            vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
            a = viz.colormap(a, vmin, vmax)
            bar = viz.colormap(np.tile(np.linspace(0, 1, 80), (6, 1)), 0.0, 1.0)
            legends[title] = (
                f'<div class="legend">{vmin:.3g}<img src="{viz.png_data_uri(bar)}" alt="">{vmax:.3g}</div>'
            )
        if a.ndim != 4 or a.shape[1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"report column {title!r}: need (K, 3, H, W) uint8 or (K, H, W) maps, got {a.shape} {a.dtype}")
        k = len(a) if k is None else min(k, len(a))
        cols[title] = [viz.png_data_uri(img) for img in a]
    head = "".join(f"<th>{html.escape(t)}{legends.get(t, '')}</th>" for t in cols)
    lead = "<th></th>" if row_names else ""
    rows = []
    for i in range(k or 0):
        name = f'<td class="rowname">{html.escape(row_names[i])}</td>' if row_names else ""
        cells = "".join(f'<td><img src="{cols[t][i]}" alt="{html.escape(t)} {i}"></td>' for t in cols)
        rows.append(f"<tr>{name}{cells}</tr>")
    return f'<table class="grid"><thead><tr>{lead}{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _settings_table(results: Mapping[str, Any]) -> str:
    """Key settings and provenance as a small table; the full record in a <details>."""
    rows = [(k, v) for k, v in results.get("settings", {}).items()]
    prov = results.get("provenance") or {}
    rows += [(k, prov[k]) for k in ("command", "created") if k in prov]
    rows += [(k, v) for k, v in (prov.get("software") or {}).items()]
    body = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )

    full = html.escape(json.dumps(json_ready({k: v for k, v in results.items() if k != "models"}), indent=1))
    return (
        f'<table class="metrics settings"><tbody>{body}</tbody></table>'
        f"<details><summary class=note>full record</summary><pre class=note>{full}</pre></details>"
    )


def _uncertainty_caption(results: Mapping[str, Any]) -> str:
    """One line per model of ``results["uncertainty"]``: lambda, samples, coverage on the shown tiles."""
    lines = []
    for name, u in (results.get("uncertainty") or {}).items():
        cov, nominal = u.get("coverage"), u.get("nominal_coverage")
        cov_txt = "-" if cov is None else f"{100 * cov:.1f}%"
        goal = "" if nominal is None else f" (calibrated for &ge; {100 * nominal:.0f}% on average)"
        if u.get("calibration_mismatch"):
            goal = " (<b>not calibrated for these settings</b>, see the warning above)"
        form = u.get("interval", "centered")
        how = ("around the sample median (centered)" if form == "centered"
               else "as [l/&lambda;, u&middot;&lambda;] on [0, 1] intensities (multiplicative)")
        lines.append(
            f"<b>{html.escape(name)}</b>: {u.get('samples', '?')} samples per tile "
            f"({html.escape(sampling_label(u.get('sampling')))}); the per-pixel "
            f"{100 * u.get('q_low', 0.05):g}-{100 * u.get('q_high', 0.95):g}% sample interval scaled by "
            f"&lambda; = {u.get('lam', float('nan')):.3g} {how} "
            f"({html.escape(str(u.get('calibration', '')))}). Real pixel values inside it on these "
            f"{u.get('n', '?')} tiles: {cov_txt}{goal}; mean width {u.get('mean_width_255', float('nan')):.1f} "
            "(0-255 RGB)."
        )
    lines.append(
        "Columns: the AF input, the real H&amp;E, the mean of the samples, the lower and upper bounds of "
        "the scaled interval, and its width (upper &minus; lower within 0-255, averaged over RGB) in viridis."
    )
    return "".join(f"<p class=note>{t}</p>" for t in lines)


def _stainnet_test(t: dict) -> str:
    """StainNet's accuracy on the scored real tiles (slide label from a patch) and its confusion matrix."""
    conf = t["confusion"]
    head = "".join(f"<th>pred {j}</th>" for j in range(len(conf)))
    rows = "".join(f"<tr><th>label {i}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                   for i, row in enumerate(conf))
    return (f"<h2>StainNet on the real {html.escape(str(t.get('split', 'test')))} tiles</h2>"
            f"<p class=note>Accuracy {t['accuracy']:.3f} on {t['patches']} tiles (chance {t['chance']:.3f}); "
            f"rows: true slide label, columns: predicted.</p><table><tr><th></th>{head}</tr>{rows}</table>")


def _claims(claims: list[dict]) -> str:
    return "".join(f"<li>{'holds' if c['holds'] else '<b>not shown</b>'}: {html.escape(c['claim'])} "
                   f"&mdash; {html.escape(c['numbers'])}</li>" for c in claims)


def _shape_section(shape: dict) -> str:
    """Whether the paper's Table 1 shape holds here, claim by claim, with the numbers."""
    verdict = "reproduced" if shape["reproduced"] else "not reproduced"
    level = {"slides": "slide-level (slides resampled)", "tiles": "tile-level (slides unknown)"}.get(
        shape.get("intervals"), "")
    more = (f"<p class=note>Beyond Table 1 (checks a sceptical reader asks for; not part of the verdict above):</p>"
            f"<ul>{_claims(shape['evidence'])}</ul>" if shape.get("evidence") else "")
    return (f"<h2>Table 1's shape: {verdict}</h2><p class=note>Sridhar et al. 2023: regression best on L1/L2 "
            f"and worst on FSD, pix2pix between, diffusion best on FSD. A claim holds here only when the two "
            f"{level} 95% intervals do not overlap.</p><ul>{_claims(shape['claims'])}</ul>{more}")


def _ci(m: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [lo, hi]`` as HTML, the interval dimmed; '&ndash;' when absent."""
    if not m or m.get("value") is None:
        return "&ndash;"
    val, _, ci = format_interval({k: (float("nan") if m.get(k) is None else m[k]) for k in ("value", "lo", "hi")},
                                 digits).partition(" ")
    return f"{val} <span class=ci>{html.escape(ci.replace('inf', 'n/a'))}</span>" if ci else val


def _grade_section(results: Mapping[str, Any]) -> str:
    """StainNet's grade accuracy on each model's tiles against the real tiles of the same slides."""
    models = {k: v["grade"] for k, v in results.get("models", {}).items() if v.get("grade")}
    if not models:
        return ""
    rows = []
    for name, g in models.items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_ci(g['tile_accuracy'])}</td>"
            f"<td>{_ci(g['real_tile_accuracy'])}</td><td>{_ci(g['tile_ratio'])}</td>"
            f"<td>{g['slides_correct']}/{g['slides']}</td><td>{g['real_slides_correct']}/{g['slides']}</td>"
            f"<td>{_ci(g['slide_ratio'])}</td><td>{_ci(g['tile_agreement'])}</td></tr>")
    first = next(iter(models.values()))
    return (
        "<h2>Grade agreement (is the steatosis grade kept?)</h2>"
        f"<p class=note>StainNet predicts the slide's grade from one tile. Its accuracy on each model's tiles "
        f"against its accuracy on the real tiles of the same {first['slides']} slides ({first['tiles']} tiles); "
        "ratio = model / real (1: the virtual stain keeps all the grade information StainNet reads in real H&amp;E). "
        "Slide level: a slide's grade is the majority vote of its tiles (ties to the lower grade). Same grade as "
        "real: tiles whose prediction equals the prediction on their real pair. 95% intervals resample slides.</p>"
        '<table class="metrics"><thead><tr><th>model</th><th>tile accuracy</th><th>real tiles</th>'
        "<th>ratio</th><th>slides right</th><th>real slides right</th><th>slide ratio</th>"
        f"<th>same grade as real</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _slides_section(results: Mapping[str, Any]) -> str:
    """The per-slide table: each test slide, each model's FSD, PFD, L1, L2 and grade accuracy."""
    table = results.get("slides")
    if not table:
        return ""
    cols = [c for c in ("FSD", "PFD", "L1", "L2", "accuracy")
            if any(c in m for rec in table for m in rec["models"].values())]
    has_acc = any("real_accuracy" in rec for rec in table)
    head = "<th>slide</th><th>grade</th><th>tiles</th>" + ("<th>real accuracy</th>" if has_acc else "") + \
        "<th>model</th>" + "".join(f"<th>{c}</th>" for c in cols)

    def cell(v: Any, c: str) -> str:
        if v is None:
            return "<td>&ndash;</td>"
        return f"<td>{v:.3g}</td>" if c in ("FSD", "PFD") else f"<td>{v:.{3 if c == 'accuracy' else 1}f}</td>"

    rows = []
    for rec in table:
        models = list(rec["models"].items()) or [("&ndash;", {})]
        span = f' rowspan="{len(models)}"'
        lead = (f"<td{span}>{html.escape(rec['slide'])}</td><td{span}>{'?' if rec['label'] is None else rec['label']}"
                f"</td><td{span}>{rec['tiles']}</td>")
        if has_acc:
            acc = rec.get("real_accuracy")
            lead += f"<td{span}>{'&ndash;' if acc is None else f'{acc:.3f}'}</td>"
        for i, (name, m) in enumerate(models):
            cells = "".join(cell(m.get(c), c) for c in cols)
            rows.append(f"<tr>{lead if i == 0 else ''}<td>{html.escape(name)}</td>{cells}</tr>")
    return ("<h2>Per slide</h2><p class=note>Each test slide on its own: FSD between its real and generated tiles "
            "(biased upward at a slide's few tiles: compare models on the same slide, not slides), mean PFD, L1 and "
            "L2 over its tiles, StainNet's grade accuracy on its generated tiles (real accuracy: on its real "
            f'tiles).</p><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _noise_section(results: Mapping[str, Any]) -> str:
    """The noise check: regression + N(0, 16) scored next to diffusion."""
    from vstain_cli.score.noise_check import sentence

    rec = results.get("noise_check")
    if not rec:
        return ""
    metrics_ = [k for k in ("FSD", "PFD", "L1", "L2") if k in rec["metrics"]]
    head = "".join(f"<th>{k} &darr;</th>" for k in metrics_)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_ci(ms.get(k), DIGITS[k])}</td>" for k in metrics_)
        + "</tr>"
        for label, ms in ((rec["against"], rec["against_metrics"]), (rec["base"], rec["base_metrics"]),
                          (rec["name"], rec["metrics"])))
    proof = rec.get("noise_proof")
    verdict = ("PFD is noise-proof here: the noisy regression does not beat diffusion" if proof else
               "<b>PFD is NOT noise-proof here: the noisy regression looks better than diffusion</b>"
               if proof is False else "PFD not scored")
    return (f"<h2>Noise check</h2><p class=note>{html.escape(rec['name'])}: the regression output plus Gaussian "
            f"noise of sd {rec['sd']:g} (0-255 units, seeded, rounded and clipped), scored as a pseudo-model. Noise "
            "makes a blurry output sharper, not truer: a metric that ranks it above diffusion rewards sharpness. "
            f"{verdict}.</p><p class=note>{html.escape(sentence(rec))}.</p>"
            f'<table class="metrics"><thead><tr><th>model</th>{head}</tr></thead><tbody>{rows}</tbody></table>')


def _interval_words(settings: Mapping[str, Any]) -> str:
    """How the intervals were made (slide-level or the tile-level fallback), with the resample counts."""
    n_boot, fd_boot = settings.get("n_boot", "?"), settings.get("fd_boot", "?")
    if settings.get("intervals") == "slides":
        return (f"slide-level cluster bootstrap: the {settings.get('n_slides', '?')} slides are resampled with "
                f"replacement and every tile of a drawn slide is kept ({n_boot} resamples for means and accuracies, "
                f"{fd_boot} for FID/FSD, recomputed on the drawn slides' pooled features); tiles of one slide are "
                "not independent, so tiles are never resampled on their own")
    return (f"tile-level (the tiles' slides are unknown: tiles resampled as if independent, which is too narrow "
            f"when tiles of a slide are alike): percentile bootstrap over tiles for means ({n_boot} resamples), "
            f"half-sample subsampling without replacement for FD ({fd_boot} subsamples)")


def write_report(
    path: str | Path,
    results: Mapping[str, Any],
    grids: Mapping[str, np.ndarray] | None = None,
    uncertainty: Mapping[str, np.ndarray] | None = None,
    row_names: list[str] | None = None,
    title: str = "vstain score",
) -> Path:
    """Write a self-contained report.html (images embedded as base64 PNG), atomically.

    ``results``: the output of ``scoring.score_image_sets`` (plus ``notes``,
    ``provenance`` and, for the uncertainty caption, ``uncertainty``: per model
    ``lam``, ``samples``, ``coverage``, ... as ``evaluate`` records). ``grids``: Fig. 2-style
    columns, e.g. {"AF (false colour)": ..., "target H&E": ..., model: ...}, each
    (K, 3, H, W) uint8 (rows are tiles). ``uncertainty``: optional Fig. 3-style
    columns (input images, lower/upper bound images as (K, 3, H, W) uint8, width
    maps as (K, H, W) floats shown in viridis with their scale, from 0 when
    non-negative).
    """
    from vstain_cli.provenance import atomic_output
    from vstain_cli.score.table1 import table1_shape

    path = Path(path)
    settings = results.get("settings", {})
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<div class=meta>{results.get('n_real', '?')} real tiles of "
        f"{'x'.join(str(s) for s in results.get('tile_size', []))} px &middot; "
        f"95% intervals: {html.escape(_interval_words(settings))} &middot; seed {settings.get('seed', '?')} &middot; "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M'))}</div>",
        "<h2>Metrics</h2>",
        _metrics_table(results),
        "<p class=note>FID: Fréchet distance on InceptionV3 pool3 features (pytorch-fid weights and "
        "preprocessing). FSD: Fréchet distance on StainNet features. PFD: paired feature distance, the mean "
        "Euclidean distance between each generated tile's StainNet features and its real pair's. L1: mean "
        "absolute error, L2: "
        "root-mean-square error, both per pixel-channel on 0-255 RGB, averaged over tiles. PSNR in dB "
        "(data range 255); SSIM with a 7x7 window. Arrows: direction of better; shaded: best per column. "
        "Definitions: docs/metrics.md.</p>",
    ]
    for w in results.get("warnings", []):
        parts.append(f"<div class=warn>{html.escape(w)}</div>")
    sn = results.get("stainnet") or {}
    if sn.get("at_chance") and not any(w.startswith("StainNet ") for w in results.get("warnings", [])):
        parts.append(f"<div class=warn>StainNet validation accuracy {sn['val_accuracy']:.3f} is at or below "
                     f"chance ({sn['chance']:.3f}): FSD means little</div>")
    elif sn.get("val_accuracy") is not None and sn.get("chance") is not None:
        parts.append(f"<p class=note>FSD features: StainNet {html.escape(Path(sn['run']).name)}, validation "
                     f"accuracy {sn['val_accuracy']:.3f} (chance {sn['chance']:.3f}).</p>")
    if sn.get("test"):
        parts.append(_stainnet_test(sn["test"]))
    shape = table1_shape(results)
    if shape is not None:
        parts.append(_shape_section(shape))
    parts += [_grade_section(results), _noise_section(results), _slides_section(results)]
    for note in results.get("notes", []):
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    if grids:
        parts += ["<h2>Examples</h2>", _image_table(grids, row_names)]
    if uncertainty:
        parts += ["<h2>Uncertainty</h2>", _image_table(uncertainty, row_names), _uncertainty_caption(results)]
    parts += ["<h2>Settings</h2>", _settings_table(results), "</body></html>"]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
