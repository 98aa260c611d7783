"""Numeric precision: resolution rules and the AMP training step (devices: vstain_cli.runtime)."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from vstain_cli.errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> tuple[str, list[str]]:
    """(precision, warnings). ``auto``: bf16 on CUDA with bf16 support, else fp32.

    bf16 is never chosen on a CPU: there it runs ~80x slower than fp32.
    """
    warnings: list[str] = []
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16", warnings
        return ("fp16" if device.type == "cuda" else "fp32"), warnings
    if name not in DTYPES:
        raise InputError(f"unknown precision {name!r} (choose bf16, fp16, fp32 or auto)")
    if device.type == "cpu" and name == "fp16":
        raise InputError("fp16 training needs a CUDA GPU; use --precision fp32 on the CPU")
    if device.type == "cpu" and name == "bf16":
        warnings.append("bf16 on the CPU is about 80x slower than fp32 here; consider --precision fp32")
    return name, warnings


class Amp:
    """Autocast + (for fp16) loss scaling + gradient clipping for one training step."""

    def __init__(self, precision: str, device: torch.device):
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], clip: float
    ) -> float:
        """Backward, unscale, clip to ``clip`` (0 = off), optimizer step; the grad norm."""
        params = [p for p in params if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        return float(norm)

    def update(self) -> None:
        """End of a training step (updates the fp16 loss scale)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
