"""The UNet of the paper: diffusion denoiser, regression baseline, pix2pix generator.

Architecture (Sridhar et al. 2023, after Ho et al. 2020 / Saharia et al. 2022):
``len(channel_mults)`` levels; each down level has ``num_res_blocks`` residual
blocks (timestep embedding added in every one) and a strided downsampling conv
(except the deepest level); a middle block; mirrored up levels that concatenate
the skip of every down block. Optional multi-head self-attention
(``F.scaled_dot_product_attention``) after each residual block of chosen levels.

Level ``i`` runs at 1/2**i of the input size (at 128 px tiles: 128, 64, 32, 16,
8, 4 for six levels). Inputs of any size are padded to a multiple of
2**(levels - 1) and the output cropped back, so whole-slide canvases work too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    """Largest power-of-two group count <= 32 dividing ``channels``."""
    g = 32
    while channels % g:
        g //= 2
    return g


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, (B,) -> (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with the time embedding added between the convs."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None and temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Global multi-head self-attention over all pixels, residual, zero-initialised out."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T/sqrt(d)) V, fused kernel
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(a)


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, cins: list[int], cout: int, temb_dim: int | None, dropout: float, heads: int | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, cout, temb_dim, dropout) for c in cins)
        self.attn = nn.ModuleList(Attention(cout, heads) if heads else nn.Identity() for _ in cins)


class UNet(nn.Module):
    """Conditional UNet: ``forward(x, t, cond)`` predicts from ``cat([cond, x])``.

    ``in_channels`` counts all input channels (AF + extra conditioning + noisy RGB
    for diffusion; AF only for regression / pix2pix). With
    ``time_embedding=False`` the network ignores ``t`` (regression, pix2pix).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] | list[int] = (),
        attention_heads: int = 1,
        mid_attention: bool = False,
        dropout: float = 0.0,
        time_embedding: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.levels = len(channel_mults)
        self.base = base_channels
        temb_dim = 4 * base_channels if time_embedding else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
            if time_embedding
            else None
        )
        chans = [base_channels * m for m in channel_mults]
        heads = [attention_heads if i in set(attention_levels) else None for i in range(self.levels)]
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base_channels]  # channels of every stored skip, stem first
        c = base_channels
        for i, co in enumerate(chans):
            cins = [c] + [co] * (num_res_blocks - 1)
            self.down.append(Level(cins, co, temb_dim, dropout, heads[i]))
            c = co
            skips += [co] * num_res_blocks
            last = i == self.levels - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)

        self.mid1 = ResBlock(c, c, temb_dim, dropout)
        self.mid_attn = Attention(c, attention_heads) if mid_attention else nn.Identity()
        self.mid2 = ResBlock(c, c, temb_dim, dropout)

        # Mirrored up path: num_res_blocks + 1 blocks per level, each consuming one
        # skip, so every down activation (and the stem) reaches the decoder.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.levels)):
            co = chans[i]
            cins = []
            for _ in range(num_res_blocks + 1):
                cins.append(c + skips.pop())
                c = co
            self.up.append(Level(cins, co, temb_dim, dropout, heads[i]))
            self.upsample.append(nn.Identity() if i == 0 else nn.Conv2d(c, c, 3, padding=1))

        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out_conv = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this."""
        return 2 ** (self.levels - 1)

    def forward(
        self, x: torch.Tensor | None, t: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        inp = torch.cat([cond, x], dim=1) if cond is not None and x is not None else (x if x is not None else cond)
        if inp.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channels, got {inp.shape[1]}")
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this UNet needs timesteps t")
            t = t.reshape(-1).expand(inp.shape[0]) if t.numel() == 1 else t
            temb = self.time_mlp(timestep_embedding(t, self.base).to(inp.dtype))
        hgt, wid = inp.shape[-2:]
        m = self.multiple
        ph, pw = (-hgt) % m, (-wid) % m
        if ph or pw:
            inp = F.pad(inp, (0, pw, 0, ph), mode="replicate")

        h = self.stem(inp)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(h, temb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level, up in zip(self.up, self.upsample, strict=True):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), temb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out[..., :hgt, :wid] if (ph or pw) else out
