"""The masked prior of Diffusion-B/R: part of the target given as extra input.

Four extra conditioning channels: the prior RGB (the target inside a random
rectangle, zero elsewhere) and a mask (1 where the prior is given). Training
draws a rectangle per sample (or none, with ``empty_prob``); inference passes a
fully masked prior (all zeros), as in the paper.
"""

from __future__ import annotations

import torch

PRIOR_CHANNELS = 4


def random_rect_prior(
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    min_frac: float = 0.25,
    max_frac: float = 0.75,
    empty_prob: float = 0.25,
) -> torch.Tensor:
    """(B, 4, H, W): x0 inside one random rectangle per sample, plus its mask."""
    b, _, h, w = x0.shape
    dev = generator.device if generator is not None else x0.device
    u = torch.rand((b, 5), generator=generator, dtype=torch.float64, device=dev).cpu()
    mask = torch.zeros((b, 1, h, w), dtype=x0.dtype)
    for i in range(b):
        if u[i, 0] < empty_prob:
            continue
        rh = max(1, round(h * (min_frac + (max_frac - min_frac) * float(u[i, 1]))))
        rw = max(1, round(w * (min_frac + (max_frac - min_frac) * float(u[i, 2]))))
        y0 = int(float(u[i, 3]) * (h - rh + 1))
        x0_ = int(float(u[i, 4]) * (w - rw + 1))
        mask[i, :, y0 : y0 + rh, x0_ : x0_ + rw] = 1.0
    mask = mask.to(x0.device)
    return torch.cat([x0 * mask, mask], dim=1)


def empty_prior(like: torch.Tensor) -> torch.Tensor:
    """A fully masked prior (all zeros) matching ``like`` (B, *, H, W)."""
    b, _, h, w = like.shape
    return torch.zeros((b, PRIOR_CHANNELS, h, w), dtype=like.dtype, device=like.device)
