"""The denoiser wrapper: one home for the prediction parameterisation (eps, v, x0).

A raw network ``net(x_t, t, cond)`` predicts eps, v or x0 depending on how it was
trained. ``Denoiser`` turns that output into the pair (x0, eps) that every sampler
needs, and gives the training target of its parameterisation, so no other module
branches on the prediction type (after k-diffusion's ``Denoiser`` and EDM's
``Precond``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI's --help stays instant
    import torch

PREDICTIONS = ("eps", "v", "x0")
RawModel = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor | None"], "torch.Tensor"]


def to_x0_eps(
    pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a network output of the given prediction type.

    eps: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) (Ho et al. 2020 eq. 15 rearranged);
    v:   x0 = sqrt(abar) x_t - sqrt(1-abar) v, eps = sqrt(1-abar) x_t + sqrt(abar) v
         (Salimans & Ho 2022 sec. 4);
    x0:  eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
    """
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "v":
        return a * x_t - s * pred, s * x_t + a * pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    raise ValueError(f"unknown prediction type {prediction!r} (choose from {', '.join(PREDICTIONS)})")


def training_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What a network of this parameterisation is trained to output at x_t.

    eps: the noise (Ho et al. 2020 eq. 14); v = sqrt(abar) eps - sqrt(1-abar) x0
    (Salimans & Ho 2022 sec. 4); x0: the clean image.
    """
    if prediction == "eps":
        return noise
    if prediction == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r} (choose from {', '.join(PREDICTIONS)})")


class Denoiser:
    """A raw network of one parameterisation, seen as an (x0, eps) predictor.

    ``net(x_t, t, cond)`` takes float timesteps (B,) and returns the raw output;
    ``denoiser(x_t, t, abar_t, cond)`` returns (x0, eps), x0 clipped to [-1, 1]
    when ``clip`` (eps re-derived from the clipped x0, as guided-diffusion does).
    """

    def __init__(self, net: RawModel, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r} (choose from {', '.join(PREDICTIONS)})")
        self.net = net
        self.prediction = prediction

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The network's own output at float timesteps ``t`` (B,)."""
        return self.net(x_t, t, cond)

    def __call__(self, x_t: torch.Tensor, t: int, abar_t: float, cond: torch.Tensor | None,
                 clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        tt = torch.full((x_t.shape[0],), float(t), device=x_t.device, dtype=torch.float32)
        pred = self.raw(x_t, tt, cond).to(x_t.dtype)
        a = torch.tensor(abar_t, dtype=x_t.dtype, device=x_t.device)
        x0, eps = to_x0_eps(pred, x_t, a, self.prediction)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
        return x0, eps

    def target(self, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """The training target for this parameterisation."""
        return training_target(x0, noise, abar, self.prediction)


def as_denoiser(model: Denoiser | RawModel, prediction: str = "eps") -> Denoiser:
    """``model`` itself when it is a Denoiser, else wrapped with ``prediction``."""
    return model if isinstance(model, Denoiser) else Denoiser(model, prediction)
