"""Reading calibration.json, and does a calibration fit the intervals being made with it?

lambda depends on the interval form, the sampler, its steps and eta, and the
number of samples per input (few samples or few-step samplers under-disperse;
docs/uncertainty.md §7). ``calibration.json`` records them; ``vstain uncertainty``
and ``vstain score`` compare them with what they run (``mismatches``).

The per-pixel calibration is the file's top level (as in every version); the
structure-scale calibrations are its ``scales`` list (``CalibrationFile.scales``,
``CalibrationFile.scale``), absent from older files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vstain_cli.diffusion.samplers import effective_eta
from vstain_cli.errors import InputError, input_errors
from vstain_cli.uq.intervals import Calibration


@dataclass
class ScaleCalibration:
    """One structure scale of a calibration: ``block_px`` px blocks (``scale_um`` µm asked for, ``block_um``
    at the tiles' mpp) and the calibration of their block means."""

    scale_um: float
    block_px: int
    block_um: float
    cal: Calibration
    meta: dict[str, Any]


@dataclass
class CalibrationFile:
    """A calibration read from disk: the parsed ``Calibration``, its raw JSON and its path."""

    cal: Calibration
    meta: dict[str, Any]
    path: Path

    @classmethod
    def read(cls, path: str | Path) -> CalibrationFile:
        """Read ``path``; InputError naming the file when missing or corrupt."""
        path = Path(path)
        cal = Calibration.from_json(path)
        return cls(cal, json.loads(path.read_text()), path)

    def scales(self) -> list[ScaleCalibration]:
        """The structure-scale calibrations (``calibrate --scale``); [] for files made without (or before) it.

        Scales whose calibration failed (an ``error`` entry) are left out.
        """
        entries = self.meta.get("scales") or []
        if not isinstance(entries, list):
            raise InputError("corrupt calibration file (scales is not a list)", self.path)
        out = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise InputError(f"corrupt calibration file (scales[{i}] is not an object)", self.path)
            if "error" in e:
                continue
            where = f"scales[{i}]"
            with input_errors(self.path):
                cal = Calibration.from_dict(e, where)
            try:
                out.append(ScaleCalibration(float(e["scale_um"]), int(e["block_px"]), float(e["block_um"]), cal, e))
            except (KeyError, TypeError, ValueError) as err:
                raise InputError(f"corrupt calibration file ({where}: bad or missing field {err})",
                                 self.path) from None
        return out

    def scale(self, um: float) -> ScaleCalibration:
        """The calibration of the ``um`` µm scale; InputError naming the file and the scales it has otherwise."""
        found = self.scales()
        for s in found:
            if abs(s.scale_um - um) < 1e-6 * max(1.0, um):
                return s
        have = ", ".join(f"{s.scale_um:g}" for s in found) or "none"
        raise InputError(f"has no calibration at --scale {um:g} µm (scales calibrated: {have}); "
                         f"run `vstain calibrate --scale {um:g} ...`", self.path)

    def sampling(self) -> dict[str, Any]:
        """What the calibration was made with: interval, sampler, steps, eta, samples (None: not recorded)."""
        m = self.meta
        sampler = m.get("sampler")
        eta = m.get("eta")
        if sampler is not None and eta is not None:
            try:
                eta = effective_eta(str(sampler), float(eta))
            except ValueError:
                pass  # an unknown sampler: compared by name below
        return {"interval": self.cal.interval, "sampler": sampler, "steps": m.get("steps_effective"),
                "eta": eta, "samples": self.cal.samples}


def mismatches(made: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"KEY made -> now"`` for every setting recorded in ``made`` that differs from ``now``."""
    out = []
    for key, value in now.items():
        old = made.get(key)
        if old is None or value is None:
            continue
        same = abs(float(old) - float(value)) < 1e-9 if key == "eta" else old == value
        if not same:
            out.append(f"{key} {old} -> {value}")
    return out


__all__ = ["CalibrationFile", "ScaleCalibration", "mismatches"]
