"""StainNet: a small CNN that classifies H&E patches into slide labels.

Trained on real H&E patches of the train split; its penultimate-layer features
(``features``) are the embedding of the Frechet StainNet Distance (FSD).
Input: RGB in [-1, 1], any size (global average pooling).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class StainNet(nn.Module):
    """``depth`` conv blocks (channels doubling, 2x2 max-pool between) -> pool -> MLP."""

    def __init__(
        self,
        n_classes: int = 4,
        base_channels: int = 32,
        depth: int = 4,
        feature_dim: int = 256,
        dropout: float = 0.2,
        in_channels: int = 3,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            co = base_channels * 2**i
            if i:
                blocks.append(nn.MaxPool2d(2))
            blocks.append(_block(c, co))
            c = co
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c, feature_dim), nn.SiLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)
        self.n_classes = n_classes
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim) used by FSD."""
        return self.embed(self.pool(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        return self.head(self.drop(self.features(x)))
