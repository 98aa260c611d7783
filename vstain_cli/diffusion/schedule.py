"""Discrete noise schedules and the forward process q(x_t | x_0).

Notation of Ho et al. 2020: beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4).
Timesteps are 0-based: t = 0 .. T-1.

Schedules (docs/models.md has abar at t = 250/500/750 of each, from bench/schedules.py):

- ``cosine`` (the paper presets): Nichol & Dhariwal 2021 eq. 17, which the paper
  follows: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
  s = 0.008, beta_t = 1 - f(t+1)/f(t) clipped at 0.999, so the 0-based
  abar_t here is f(t+1)/f(0) (exactly, until the clip bites in the last steps). It has no beta range:
  ``beta_start`` / ``beta_end`` are ignored.
- ``linear``: beta from ``beta_start`` to ``beta_end`` linearly (Ho et al. 2020, 1e-4..0.02).
- ``cosine-beta``: a literal reading of the paper's "cosine schedule from 1e-4 to
  0.02" as a beta ramp, kept selectable for runs trained with it:
  beta_t = beta_start + (beta_end - beta_start) * (1 - cos(pi t/(T-1))) / 2.
  Nearly linear in abar (0.154 at t = 500, linear 0.078, cosine 0.492).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("linear", "cosine", "cosine-beta")


def make_betas(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """float64 betas (T,) of a named schedule."""
    T = int(timesteps)
    if T < 2:
        raise ValueError("timesteps must be >= 2")
    if name == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    if name == "cosine-beta":
        ramp = (1.0 - np.cos(math.pi * np.arange(T, dtype=np.float64) / (T - 1))) / 2.0
        return beta_start + (beta_end - beta_start) * ramp
    raise ValueError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


@dataclass(frozen=True)
class Schedule:
    """A discrete schedule; arrays are float64 numpy, indexed by 0-based t."""

    name: str
    betas: np.ndarray

    @classmethod
    def make(cls, name: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Build a named schedule (see module docstring)."""
        return cls(name, make_betas(name, timesteps, beta_start, beta_end))

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
        """abar_t as a tensor broadcastable against ``like`` (B, C, H, W)."""
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        t = torch.as_tensor(t, dtype=torch.long, device="cpu")
        out = ac[t.cpu()]
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
        return out

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020 eq. 4)."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio abar/(1-abar) per timestep."""
        ac = self.alphas_cumprod
        return ac / (1.0 - ac)
