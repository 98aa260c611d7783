"""Training losses of the diffusion models (the network is passed in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vstain_cli.diffusion.denoiser import Denoiser, as_denoiser
from vstain_cli.diffusion.schedule import Schedule


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    schedule: Schedule,
    *,
    loss: str = "l2",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simple denoising loss, Ho et al. 2020 eq. 14: E ||target - model(x_t, t, cond)||.

    t ~ U{0..T-1}, eps ~ N(0, I) drawn from ``generator`` on its device;
    the target is the denoiser's parameterisation (eps, v or x0; see denoiser.py).
    """
    denoiser = as_denoiser(denoiser)
    b = x0.shape[0]
    dev = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.T, (b,), generator=generator, device=dev)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32)
    t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    target = denoiser.target(x0, noise, schedule.abar(t, x0))
    pred = denoiser.raw(x_t, t.float(), cond).float()
    return pixel_loss(pred, target.float(), loss)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean L1 or L2 (squared) error."""
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r} (choose l1 or l2)")
