"""Build the networks a preset describes, for a dataset of ``channels`` AF channels."""

from __future__ import annotations

from torch import nn

from vstain_cli.diffusion.prior import PRIOR_CHANNELS
from vstain_cli.nets.discriminator import PatchDiscriminator
from vstain_cli.nets.stainnet import StainNet
from vstain_cli.nets.unet import UNet
from vstain_cli.train.presets import Preset


def cond_channels(preset: Preset, channels: int) -> int:
    """Conditioning channels: AF, plus prior RGB + mask for Diffusion-B/R."""
    prior = preset.kind == "diffusion" and preset.diffusion.prior
    return channels + (PRIOR_CHANNELS if prior else 0)


def build_network(preset: Preset, channels: int) -> nn.Module:
    """The main network: UNet (diffusion, regression, pix2pix generator) or StainNet.

    Regression and the pix2pix generator are the preset's UNet without the time input.
    """
    if preset.kind == "stainnet":
        s = preset.stainnet
        return StainNet(s.n_classes, s.base_channels, s.depth, s.feature_dim, s.dropout)
    m = preset.model
    diffusion = preset.kind == "diffusion"
    return UNet(
        in_channels=cond_channels(preset, channels) + (3 if diffusion else 0),
        out_channels=3,
        base_channels=m.base_channels,
        channel_mults=m.channel_mults,
        num_res_blocks=m.num_res_blocks,
        attention_levels=m.attention_levels,
        attention_heads=m.attention_heads,
        attention_up=m.attention_up,
        dropout=m.dropout,
        time_embedding=diffusion,
    )


def build_discriminators(preset: Preset, channels: int) -> tuple[nn.Module, nn.Module]:
    """pix2pix: a conditional PatchGAN on (AF, RGB) and an unconditional one on RGB."""
    p = preset.pix2pix
    return (
        PatchDiscriminator(channels + 3, p.disc_channels, p.disc_layers),
        PatchDiscriminator(3, p.disc_channels, p.disc_layers),
    )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
