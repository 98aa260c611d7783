"""Does a calibration fit the intervals being made with it?

lambda depends on the interval form, the sampler, its steps and eta, and the
number of samples per input (few samples or few-step samplers under-disperse;
docs/uncertainty.md §7). ``calibration.json`` records them; ``vstain uncertainty``
and ``vstain score`` compare them with what they run (``mismatches``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vstain_cli.diffusion.samplers import effective_eta
from vstain_cli.uq.intervals import Calibration


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


__all__ = ["CalibrationFile", "mismatches"]
