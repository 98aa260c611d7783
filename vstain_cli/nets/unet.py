"""The UNet of the paper: diffusion denoiser, regression baseline, pix2pix generator.

Sridhar et al. 2023, sec. 4.1: ``len(channel_mults)`` **down blocks**, each
``num_res_blocks`` residual layers and a strided downsampling convolution; a
middle block at the bottleneck; as many **up blocks**, mirrored (an upsampling
convolution and ``num_res_blocks`` residual layers, each fed the skip of its
mirror residual layer in the down block); the timestep embedding is added in
every residual block.

Resolutions ("levels"): down block ``i`` runs at ``tile / 2**i`` and hands
``tile / 2**(i + 1)`` on; level ``n = len(channel_mults)`` is the middle block.
At 128 px with six down blocks: 128, 64, 32, 16, 8, 4 and the middle at 2.
``attention_levels`` lists the levels that get one global multi-head
self-attention layer (``F.scaled_dot_product_attention``): in the down block
after its residual layers, in the middle block between its two residual layers,
and with ``attention_up`` also after the residual layers of the mirrored up block.

Inputs of any size are padded to a multiple of ``2**n`` and the output cropped
back, so whole-slide canvases work too.
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
    """Global multi-head self-attention over all pixels, residual, zero-initialised out.

    Runs through ``F.scaled_dot_product_attention``, whose fused flash /
    memory-efficient kernels never materialise the (HW x HW) weight matrix, so
    64x64 maps (4,096 tokens) fit in GPU memory at training batch sizes.
    """

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
        # (3, B, heads, HW, d), contiguous: the layout the fused kernels take without copies
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d)) V
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(a)


class DownBlock(nn.Module):
    """Residual layers at one resolution, [attention], a stride-2 3x3 downsampling conv."""

    def __init__(self, cin: int, cout: int, n_res: int, temb_dim: int | None, dropout: float, heads: int | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, temb_dim, dropout) for j in range(n_res))
        self.attn = Attention(cout, heads) if heads else nn.Identity()
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1)


class UpBlock(nn.Module):
    """Mirror of a DownBlock: nearest 2x + 3x3 conv, residual layers on (h, skip), [attention]."""

    def __init__(self, cin: int, skips: list[int], cout: int, temb_dim: int | None, dropout: float, heads: int | None):
        super().__init__()
        self.up = nn.Conv2d(cin, cin, 3, padding=1)
        cins = [cin] + [cout] * (len(skips) - 1)
        self.res = nn.ModuleList(ResBlock(c + s, cout, temb_dim, dropout) for c, s in zip(cins, skips, strict=True))
        self.attn = Attention(cout, heads) if heads else nn.Identity()


class UNet(nn.Module):
    """Conditional UNet: ``forward(x, t, cond)`` predicts from ``cat([cond, x])``.

    ``in_channels`` counts all input channels (AF + extra conditioning + noisy RGB
    for diffusion; AF only for regression / pix2pix). With
    ``time_embedding=False`` the network ignores ``t`` (regression, pix2pix).
    ``attention_levels`` holds levels 0..len(channel_mults), the last being the
    middle block (see the module docstring).
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
        attention_up: bool = False,
        dropout: float = 0.0,
        time_embedding: bool = True,
    ):
        super().__init__()
        n = len(channel_mults)
        bad = sorted(set(attention_levels) - set(range(n + 1)))
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{n} (level {n} is the middle block)")
        self.in_channels = in_channels
        self.levels = n
        self.base = base_channels
        temb_dim = 4 * base_channels if time_embedding else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
            if time_embedding
            else None
        )
        chans = [base_channels * m for m in channel_mults]
        heads = [attention_heads if i in set(attention_levels) else None for i in range(n + 1)]
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        c = base_channels
        for i, co in enumerate(chans):
            self.down.append(DownBlock(c, co, num_res_blocks, temb_dim, dropout, heads[i]))
            c = co

        self.mid1 = ResBlock(c, c, temb_dim, dropout)
        self.mid_attn = Attention(c, attention_heads) if heads[n] else nn.Identity()
        self.mid2 = ResBlock(c, c, temb_dim, dropout)

        # Up blocks, deepest first; up block i consumes the skips of down block i, last one first.
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            self.up.append(
                UpBlock(c, [chans[i]] * num_res_blocks, chans[i], temb_dim, dropout, heads[i] if attention_up else None)
            )
            c = chans[i]

        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out_conv = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this."""
        return 2**self.levels

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
        skips = []
        for block in self.down:
            for j, res in enumerate(block.res):
                h = res(h, temb)
                if j == len(block.res) - 1:
                    h = block.attn(h)
                skips.append(h)
            h = block.down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for block in self.up:
            h = block.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            for res in block.res:
                h = res(torch.cat([h, skips.pop()], dim=1), temb)
            h = block.attn(h)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out[..., :hgt, :wid] if (ph or pw) else out
