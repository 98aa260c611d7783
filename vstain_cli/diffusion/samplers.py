"""Samplers: functions of (denoiser, x_T, schedule, cond); the network never owns them.

Every sampler has one signature::

    fn(denoiser, x_T, schedule, cond, *, steps, eta, clip_x0, generator, callback) -> x_0

``denoiser`` is a ``Denoiser`` (it owns the prediction parameterisation) or a raw
eps-predicting ``model(x_t, t, cond)``. All noise is drawn from ``generator``, so
one seed gives the same result bit for bit on CPU. Every sampler ends on
abar = 1, i.e. returns its last x_0 estimate. ``SAMPLERS`` is the registry: it
owns each sampler's default number of steps; to add a sampler, write the
function and register it (docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI's --help stays instant
    import torch

from vstain_cli.diffusion.denoiser import Denoiser, RawModel, as_denoiser

if TYPE_CHECKING:
    from vstain_cli.diffusion.schedule import Schedule

StepCallback = Callable[[int, int, "torch.Tensor"], None]


class SamplerFn(Protocol):
    def __call__(self, denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, cond: torch.Tensor | None, *,
                 steps: int, eta: float, clip_x0: bool, generator: torch.Generator | None,
                 callback: StepCallback | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, default steps (a function of T) and a one-line summary."""

    fn: SamplerFn
    default_steps: Callable[[int], int]
    summary: str
    stochastic: bool


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` descending timesteps from T-1, evenly spaced ("trailing", Lin et al. 2024)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return [int(t) for t in ts[:steps]]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    import torch

    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _abars(schedule: Schedule, ts: list[int]) -> list[float]:
    """abar at each visited timestep, then 1.0 (the clean image after the last step)."""
    ac = schedule.alphas_cumprod
    return [float(ac[t]) for t in ts] + [1.0]


def ddpm(denoiser, x_T, schedule, cond, *, steps, eta=1.0, clip_x0=True, generator=None, callback=None):
    """Ancestral DDPM (Ho et al. 2020 eq. 6-7); fewer than T steps respace the chain
    (Nichol & Dhariwal 2021 sec. 4). ``eta`` is ignored (always the posterior variance)."""
    ts = timesteps(schedule.T, int(steps))
    abars, x, n = _abars(schedule, ts), x_T, len(ts)
    for i, t in enumerate(ts):
        a_t, a_prev = abars[i], abars[i + 1]
        x0, _ = denoiser(x, t, a_t, cond, clip_x0)
        # Posterior q(x_{t-1} | x_t, x0) of the (respaced) chain, Ho et al. eq. 6-7.
        beta = 1.0 - a_t / a_prev
        c0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
        ct = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
        var = beta * (1.0 - a_prev) / (1.0 - a_t)
        x = c0 * x0 + ct * x
        if i < n - 1:
            x = x + math.sqrt(var) * _noise(x, generator)
        if callback is not None:
            callback(i, n, x)
    return x


def ddim(denoiser, x_T, schedule, cond, *, steps, eta=0.0, clip_x0=True, generator=None, callback=None):
    """DDIM, Song et al. 2021 eq. 12 (sigma from eq. 16 scaled by ``eta``: 0 deterministic, 1 DDPM-like)."""
    ts = timesteps(schedule.T, int(steps))
    abars, x, n = _abars(schedule, ts), x_T, len(ts)
    for i, t in enumerate(ts):
        a_t, a_prev = abars[i], abars[i + 1]
        x0, eps = denoiser(x, t, a_t, cond, clip_x0)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and i < n - 1:
            x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback(i, n, x)
    return x


def dpmpp_2m(denoiser, x_T, schedule, cond, *, steps, eta=0.0, clip_x0=True, generator=None, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++") alg. 2, data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha/sigma),
    h_i = lambda_i - lambda_{i-1}:
    x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}, r_i = h_{i-1}/h_i
    (first order on the first step; the final step to sigma = 0 returns x0).
    Deterministic: ``eta`` and ``generator`` are unused.
    """
    ts = timesteps(schedule.T, int(steps))
    abars, x, n = _abars(schedule, ts), x_T, len(ts)
    lam = [0.5 * math.log(a / (1.0 - a)) if a < 1.0 else math.inf for a in abars]
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0, _ = denoiser(x, t, abars[i], cond, clip_x0)
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


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm, lambda T: T, "ancestral DDPM, T steps (the paper's protocol)", True),
    "ddim": SamplerSpec(ddim, lambda T: min(50, T), "DDIM, 50 steps, eta 0 (deterministic)", False),
    "dpmpp-2m": SamplerSpec(dpmpp_2m, lambda T: min(20, T), "DPM-Solver++(2M), 20 steps (deterministic)", False),
}


def check_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``; ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def default_steps(sampler: str, T: int) -> int:
    """The number of steps ``sampler`` runs when none is given (the registry's rule)."""
    return check_sampler(sampler).default_steps(T)


def resolve_steps(sampler: str, steps: int | None, T: int) -> int:
    """``steps`` when given, else the sampler's default for a T-step schedule."""
    return default_steps(sampler, T) if steps is None else int(steps)


#: Sampling protocols of ``--protocol``: "fast" runs the --sampler/--steps/--eta given
#: (default DDIM, 50 steps, eta 0); "paper" runs ancestral DDPM over the model's T
#: steps, the reverse process Sridhar et al. 2023 sample (Ho et al. 2020).
PROTOCOLS = {
    "fast": "the --sampler, --steps and --eta given (default DDIM, 50 steps, eta 0)",
    "paper": "ancestral DDPM over the model's T steps (the paper's reverse process; slow)",
}


def resolve_protocol(protocol: str, sampler: str, steps: int | None, eta: float) -> tuple[str, int | None, float]:
    """(sampler, steps, eta) a protocol runs; ValueError for an unknown protocol or a conflicting flag.

    "paper" replaces the default sampler (DDIM) by DDPM with its default steps (T);
    an explicit other sampler or step count contradicts it.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    if protocol == "fast":
        return sampler, steps, eta
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"--protocol paper samples with ddpm; drop --sampler {sampler}")
    if steps is not None:
        raise ValueError(f"--protocol paper runs the model's T steps; drop --steps {steps}")
    return "ddpm", None, 1.0


def effective_eta(sampler: str, eta: float) -> float:
    """The eta a sampler actually uses: DDPM is DDIM with eta = 1 (Song et al. 2021 eq. 16), the
    deterministic solvers 0."""
    spec = check_sampler(sampler)
    if sampler == "ddpm":
        return 1.0
    return float(eta) if spec.stochastic or sampler == "ddim" else 0.0


def protocol_record(protocol: str, sampler: str, steps: int | None, eta: float, T: int) -> dict[str, object]:
    """What produced a number: {"protocol", "sampler", "steps" (effective), "eta" (effective)}."""
    return {"protocol": protocol, "sampler": sampler, "steps": resolve_steps(sampler, steps, T),
            "eta": effective_eta(sampler, eta)}


def protocol_label(rec: dict[str, object]) -> str:
    """A protocol record as a short label, e.g. "DDIM-50, eta 0" or "DDPM-1000 (paper)"."""
    label = f"{str(rec['sampler']).upper()}-{rec['steps']}, eta {float(rec['eta']):g}"
    return f"{label} (paper)" if rec.get("protocol") == "paper" else label


def sample(
    denoiser: Denoiser | RawModel,
    x_T: torch.Tensor,
    schedule: Schedule,
    cond: torch.Tensor | None,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run a registered sampler from pure noise ``x_T`` to x_0.

    ``steps`` defaults to the sampler's registered default (``SAMPLERS``);
    ``callback(step_index, n_steps, x)`` is called after every step.
    """
    spec = check_sampler(sampler)
    return spec.fn(as_denoiser(denoiser), x_T, schedule, cond, steps=resolve_steps(sampler, steps, schedule.T),
                   eta=eta, clip_x0=clip_x0, generator=generator, callback=callback)
