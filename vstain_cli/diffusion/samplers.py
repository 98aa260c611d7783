"""Samplers: functions of (model, x_T, schedule, cond); the network never owns them.

``model(x_t, t, cond)`` returns the raw network output (eps or v) for a batch or
canvas of any spatial size; ``t`` is a float tensor (B,) of 0-based timesteps.
All noise is drawn from ``generator``, so one seed gives the same result bit for
bit on CPU. Every sampler ends on abar = 1, i.e. returns its last x_0 estimate.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from vstain_cli.diffusion.schedule import Schedule, to_x0_eps

SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")
Model = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` descending timesteps from T-1, evenly spaced ("trailing", Lin et al. 2024)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return [int(t) for t in ts[:steps]]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _denoise(model: Model, x, t: int, a_t: float, cond, prediction: str, clip: bool):
    """Network call -> (x0, eps) at timestep t, x0 optionally clipped to [-1, 1]."""
    tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    pred = model(x, tt, cond).to(x.dtype)
    a = torch.tensor(a_t, dtype=x.dtype, device=x.device)
    x0, eps = to_x0_eps(pred, x, a, prediction)
    if clip:
        # Re-derive eps from the clipped x0 (as guided-diffusion does for DDIM).
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
    return x0, eps


def sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    cond: torch.Tensor | None,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    prediction: str = "eps",
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run a sampler from pure noise ``x_T`` to x_0.

    ``sampler``: ``ddpm`` (ancestral, Ho et al. 2020; ``steps`` defaults to T,
    fewer steps use respacing, Nichol & Dhariwal 2021 sec. 4), ``ddim`` (Song et
    al. 2021 eq. 12, ``eta`` = 0 deterministic, 1 = DDPM variance; default 50
    steps) or ``dpmpp-2m`` (DPM-Solver++(2M), Lu et al. 2022 alg. 2; default 20
    steps). ``callback(step_index, n_steps, x)`` is called after every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if steps is None:
        steps = {"ddpm": schedule.T, "ddim": 50, "dpmpp-2m": 20}[sampler]
    ts = timesteps(schedule.T, int(steps))
    ac = schedule.alphas_cumprod
    abars = [float(ac[t]) for t in ts] + [1.0]  # abar after the last step: clean image
    x = x_T
    n = len(ts)
    if sampler == "dpmpp-2m":
        return _dpmpp_2m(model, x, ts, abars, cond, prediction, clip_x0, callback)
    for i, t in enumerate(ts):
        a_t, a_prev = abars[i], abars[i + 1]
        x0, eps = _denoise(model, x, t, a_t, cond, prediction, clip_x0)
        if sampler == "ddpm":
            # Posterior q(x_{t-1} | x_t, x0) of the (respaced) chain, Ho et al. eq. 6-7.
            beta = 1.0 - a_t / a_prev
            c0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
            ct = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
            var = beta * (1.0 - a_prev) / (1.0 - a_t)
            x = c0 * x0 + ct * x
            if i < n - 1:
                x = x + math.sqrt(var) * _noise(x, generator)
        else:
            # DDIM, Song et al. 2021 eq. 12 (sigma from eq. 16 scaled by eta).
            sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0 and i < n - 1:
                x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback(i, n, x)
    return x


def _dpmpp_2m(model, x, ts, abars, cond, prediction, clip, callback):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++") alg. 2, data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha/sigma),
    h_i = lambda_i - lambda_{i-1}:
    x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}, r_i = h_{i-1}/h_i
    (first order on the first step; the final step to sigma = 0 returns x0).
    """
    n = len(ts)
    lam = [0.5 * math.log(a / (1.0 - a)) if a < 1.0 else math.inf for a in abars]
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0, _ = _denoise(model, x, t, abars[i], cond, prediction, clip)
        a_next = abars[i + 1]
        if a_next >= 1.0:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
            s_ratio = math.sqrt((1.0 - a_next) / (1.0 - abars[i]))
            x = s_ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, n, x)
    return x
