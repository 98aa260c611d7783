"""Checkpoint files that load without unpickling code.

``weights.safetensors``: inference weights (EMA for diffusion; the generator for
pix2pix), with metadata. ``state.pt``: everything a resume needs (networks,
EMA, optimizers, loss scale, step, RNG states) as plain tensors and containers,
read back with ``torch.load(weights_only=True)``. Both are written atomically
(temporary file + rename), weights first: a crash between the two leaves a
state that is at most one checkpoint older than the weights, and resuming from
it replays the same steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vstain_cli.errors import InputError
from vstain_cli.provenance import atomic_output
from vstain_cli.train.run_folder import STATE, WEIGHTS  # noqa: F401 - re-exported for callers

STATE_FORMAT = "vstain-train-state"


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a safetensors file atomically; metadata values become strings."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; follow the umask like open()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; InputError names the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError("weights file not found (has this run saved a checkpoint?)", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"corrupt weights file ({e})", path) from None
    return tensors, meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save of plain tensors/containers, atomically."""
    with atomic_output(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True`` (no code is unpickled)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError("training state not found", path) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"corrupt training state ({type(e).__name__}: {e})", path) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError("not a vstain training state", path)
    return state


def rng_state() -> dict[str, Any]:
    """Global torch RNG states (CPU and CUDA) as tensors."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA states only where devices match)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
