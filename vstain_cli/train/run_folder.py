"""The run folder ``runs/NAME/``: resolved config, start-or-resume decision, metrics log.

Files (the names live here and nowhere else): ``config.json`` (resolved preset +
dataset fingerprint + provenance), ``weights.safetensors``, ``state.pt``,
``metrics.jsonl``, ``samples/step-N.png``, and ``calibration.json`` from calibrate.

``config.json`` is written once, when a run starts: it names the command that
started it. Each resume appends a ``resume`` line to metrics.jsonl instead.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vstain_cli.data.store import DatasetInfo
from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.provenance import atomic_output, fingerprint, record, write_json
from vstain_cli.train.presets import Preset

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
CALIBRATION_FILE = "calibration.json"   # written by `vstain calibrate`, read by uncertainty and score
RUN_FORMAT = "vstain-run"
# Settings that may change between a run and its resume.
RESUMABLE = ("preset.train.steps", "preset.train.precision", "preset.train.workers")
# Settings added to presets after runs were made, with the value that reproduces those runs.
ADDED_DEFAULTS = {"preset.train.keep": "last"}


def run_config(preset: Preset, info: DatasetInfo, *, world_size: int, device: str, precision: str) -> dict[str, Any]:
    """The resolved config a run records (and a resume must match)."""
    runtime = {"device": device, "precision": precision, "world_size": world_size}
    return {
        "format": RUN_FORMAT,
        "format_version": 1,
        "preset": preset.to_dict(),
        "preset_source": preset.source,
        "kind": preset.kind,
        "channels": info.channels,
        "tile_size": info.tile_size,
        "dataset": {
            **info.fingerprint(),
            "af_normalization": {"low": info.af_low.tolist(), "high": info.af_high.tolist()},
        },
        "runtime": runtime,
        "provenance": record(runtime, {"dataset.json": fingerprint(info.root / "dataset.json")}),
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring resumable and provenance fields."""
    skip = ("provenance", "runtime", "preset_source", "dataset.root")
    a, b = _flat(old), _flat(new)
    for k, v in ADDED_DEFAULTS.items():
        if k not in a and k in b:
            a[k] = v
    keys = sorted(set(a) | set(b))
    return [k for k in keys if not k.startswith(skip) and k not in RESUMABLE and a.get(k) != b.get(k)]


def plan(out: Path, config: dict[str, Any], *, resume: bool, force: bool) -> str:
    """``fresh`` or ``resume``, or an error explaining why neither is safe.

    A matching run with a checkpoint is resumed (unless ``resume`` is False);
    ``force`` overrides the refusals: a different or unreadable run, or a
    checkpoint that ``--no-resume`` would discard, is started over.
    """
    cfg_path, state = out / CONFIG, out / STATE
    if not cfg_path.exists():
        if state.exists() and not force:
            raise InputError("holds a training state but no config.json; pass --force to start over", out)
        return "fresh"
    try:
        old = json.loads(cfg_path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if force:
            return "fresh"
        raise InputError(f"corrupt run config ({e}); pass --force to start over", cfg_path) from None
    if old.get("channels") != config["channels"]:
        if force:
            return "fresh"
        raise InputError(
            f"the run was trained on {old.get('channels')} AF channels but the dataset has "
            f"{config['channels']}; use a matching dataset, another --out, or --force to start over",
            out,
        )
    diffs = config_differences(old, config)
    if diffs:
        if force:
            return "fresh"
        shown = ", ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        raise InputError(
            f"holds a run with a different config ({shown}); pass --force to start over or choose another --out",
            out,
        )
    if not state.exists():
        return "fresh"
    if resume:
        return "resume"
    if force:
        return "fresh"
    raise OutputExistsError("holds a checkpoint; rerun with --resume to continue it or --force to start over", out)


def clear(out: Path) -> None:
    """Remove the files of an earlier run in ``out`` (only vstain's own)."""
    for name in (CONFIG, STATE, WEIGHTS, METRICS):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / SAMPLES, ignore_errors=True)


def write_config(out: Path, config: dict[str, Any]) -> None:
    write_json(out / CONFIG, config)


def record_resume(out: Path, config: dict[str, Any], step: int) -> None:
    """Log a resume at ``step`` (metrics.jsonl ``split: resume``) with the command and settings that resumed it."""
    append_metrics(out, {"step": step, "split": "resume", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                         "steps": config["preset"]["train"]["steps"], "runtime": config["runtime"]})


def resumes(out: str | Path) -> list[dict[str, Any]]:
    """The ``resume`` lines of a run's metrics.jsonl (step, time, command), oldest first."""
    return [r for r in read_metrics(out) if r.get("split") == "resume"]


def end_record(out: str | Path) -> dict[str, Any] | None:
    """The last ``end`` line of metrics.jsonl (step, elapsed_s; with keep = "best-val" also best_step and its
    val loss ``value``), or None when the run has not finished."""
    end = [r for r in read_metrics(out) if r.get("split") == "end"]
    return end[-1] if end else None


def append_metrics(out: Path, rec: dict[str, Any]) -> None:
    """Append one JSON line to metrics.jsonl."""
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(rec, default=_plain) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop lines logged after ``step`` (work lost by an interrupted run)."""
    path = out / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a half-written last line
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{ln}\n" for ln in keep))


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _plain(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
