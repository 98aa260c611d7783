"""Runs that ship with vstain: phantom-trained models resolvable by name.

``models/runs/NAME/`` (installed as ``vstain_cli.presets/runs/NAME``) holds a
run folder without its resume state (``config.json``, ``weights.safetensors``,
``metrics.jsonl`` and, for diffusion, ``calibration.json``).
``models/runs/bundle.json``, written by ``vstain demo --retrain --export-bundle``
and never by hand, records the command that made them, the recipe, the phantom
generator's version and a fingerprint of its pixels, the dataset's split sizes
and tiler fingerprint, each step's wall time and resumes, each run's steps and
best step (a distilled run's also its K, phases and teacher), and the scores
the demo measured with them. Anywhere a run
folder is accepted, a bundled name (``phantom-diffusion``) works too, unless a
folder of that name exists in the working directory.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vstain_cli.io.outputs import FolderOutput
from vstain_cli.train.run_folder import CALIBRATION_FILE, CONFIG, METRICS, WEIGHTS

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "vstain-bundle"
# The demo's model names -> bundled run names.
BUNDLED = {"diffusion": "phantom-diffusion", "regression": "phantom-regression", "pix2pix": "phantom-pix2pix",
           "stainnet": "phantom-stainnet",
           # `vstain distill` of phantom-diffusion (the demo's distill stage): K-step samplers and the interval run
           "diffusion-4step": "phantom-diffusion-4step", "diffusion-2step": "phantom-diffusion-2step",
           "diffusion-intervals": "phantom-diffusion-intervals"}
SHIPPED_FILES = (CONFIG, WEIGHTS, METRICS, CALIBRATION_FILE)


def bundle_root() -> Path:
    """The folder of bundled runs (``models/runs`` in a checkout)."""
    return Path(str(importlib.resources.files("vstain_cli.presets"))) / "runs"


def bundled_names() -> list[str]:
    """Names of the runs that ship with this install."""
    root = bundle_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file())


def bundled_path(name: str | Path, root: Path | None = None) -> Path | None:
    """The bundled run folder called ``name`` (in ``root``, default ``bundle_root()``), or None when ``name`` is
    a path or not bundled."""
    text = str(name)
    if "/" in text or "\\" in text or Path(text).exists():
        return None
    path = (root or bundle_root()) / text
    return path if (path / CONFIG).is_file() else None


def publish_run_copy(src: Path, dst: Path, files: Iterable[str] = SHIPPED_FILES) -> Path:
    """Copy the named files that run folder ``src`` has into the folder ``dst``, published whole
    (``FolderOutput``: a temporary folder renamed onto ``dst``, replacing an older copy of a run)."""
    with FolderOutput(dst, force=True, marker=CONFIG).publish() as tmp:
        for name in files:
            if (Path(src) / name).exists():
                shutil.copy2(Path(src) / name, tmp / name)
    return Path(dst)


def read_manifest(root: Path | None = None) -> dict[str, Any] | None:
    """``bundle.json`` of the bundled runs (in ``root``, default ``bundle_root()``), or None when none ship."""
    path = (root or bundle_root()) / BUNDLE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def phantom_fingerprint(size: int = 96, mpp: float = 1.0, channels: int = 26, seed: int = 0) -> str:
    """SHA-256 of a small phantom pair rendered in memory (every grade, AF and H&E).

    A change to ``vstain synth`` that changes its pixels changes this value, so
    the bundled runs (trained on phantom data) are then known to be stale.
    """
    from vstain_cli.data.synth.render import PhantomRenderer, SlideSpec

    digest = hashlib.sha256()
    for label in range(4):
        spec = SlideSpec.random(f"fp{label}", label, size, size, channels, mpp, seed * 100003 + label)
        strip = PhantomRenderer(spec).render(0, size)
        digest.update(np.ascontiguousarray(strip.af).tobytes())
        digest.update(np.ascontiguousarray(strip.he).tobytes())
    return digest.hexdigest()
