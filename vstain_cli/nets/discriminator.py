"""PatchGAN discriminator (Isola et al. 2017, pix2pix; 70x70 with 3 layers).

Conv(4x4, stride 2) - LeakyReLU(0.2) blocks with InstanceNorm (no running
statistics, so it behaves the same in train/eval and under DDP), ending in a
1-channel map of per-patch real/fake scores (raw, for a least-squares GAN loss).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """Scores overlapping patches of ``in_channels`` images; output (B, 1, h, w)."""

    def __init__(self, in_channels: int, base_channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = base_channels
        for i in range(1, layers + 1):
            co = base_channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(c, co, 4, stride, 1, bias=False),
                nn.InstanceNorm2d(co, affine=True),
                nn.LeakyReLU(0.2, True),
            ]
            c = co
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
