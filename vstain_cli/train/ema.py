"""Exponential moving average of weights (the weights diffusion models sample with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` tracking it with decay ``decay``.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n
    updates (as in guided-diffusion / TF's ExponentialMovingAverage), so short
    runs are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s weights in after optimizer step ``step`` (0-based)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
