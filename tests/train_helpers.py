"""Helpers for the training tests: very small presets (base 8 channels, 2 levels)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vstain_cli.train.presets import Preset, load_preset

MICRO = {
    "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
              "attention_heads": 1},
    "stainnet": {"base_channels": 4, "depth": 2, "feature_dim": 8},
    "pix2pix": {"disc_channels": 8, "disc_layers": 1},
    "diffusion": {"sample_steps": 3},
    "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 2, "val_every": 2,
              "log_every": 1, "val_batches": 1, "sample_count": 2, "ema_decay": 0.9},
}


def micro_dict(name: str = "tiny-diffusion", **sections: dict[str, Any]) -> dict[str, Any]:
    """The plain-data form of a bundled tiny preset shrunk further (seconds on 1 core)."""
    d = load_preset(name).to_dict()
    for sec, vals in MICRO.items():
        if sec in d:
            d[sec].update(copy.deepcopy(vals))
    for sec, vals in sections.items():
        d[sec].update(vals)
    d["name"] = "micro-" + name.removeprefix("tiny-")
    return d


def micro(name: str = "tiny-diffusion", **sections: dict[str, Any]) -> Preset:
    """A Preset from ``micro_dict``."""
    return Preset.from_dict(micro_dict(name, **sections), source=f"<micro {name}>")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def write_preset(path: Path, data: dict[str, Any]) -> Path:
    """Write a preset dict as TOML (scalars and lists only; None values omitted)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for sec, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{sec}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path
