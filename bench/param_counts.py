"""Print the parameter count of every bundled preset (a markdown table).

Usage: python bench/param_counts.py [--channels 26]

The counts depend on the AF channel count only through the first conv (and the
conditional discriminator); the paper has 26 channels. The UNet column is read off
the built network: down blocks x residual layers, and every attention layer as
resolution x heads, at 128 px tiles for the paper presets and 32 px for tiny-*.
"""

from __future__ import annotations

import argparse

from vstain_cli.nets.unet import Attention, UNet
from vstain_cli.train.networks import build_discriminators, build_network, cond_channels, count_parameters
from vstain_cli.train.presets import list_presets, load_preset


def attention_layers(net: UNet, tile: int) -> list[tuple[int, int]]:
    """(resolution in px, heads) of every attention layer, down path, middle, up path."""
    n = net.levels
    at = [(i, b.attn) for i, b in enumerate(net.down)] + [(n, net.mid_attn)]
    at += [(n - 1 - j, b.attn) for j, b in enumerate(net.up)]
    return [(tile >> i, a.heads) for i, a in at if isinstance(a, Attention)]


def unet_summary(net: UNet, tile: int) -> str:
    """'6 down blocks x 2 res, base 64 x [...]; 1 attention layer (1-head) at 16 px' for a UNet."""
    res = len(net.down[0].res)
    att = attention_layers(net, tile)
    heads = sorted({h for _, h in att})
    where = ", ".join(str(r) for r, _ in att)
    att_s = f"{len(att)} attention layer{'s' if len(att) != 1 else ''}" + (
        f" ({'/'.join(map(str, heads))}-head) at {where} px" if att else ""
    )
    mults = [b.res[0].conv1.out_channels // net.base for b in net.down]
    return f"{net.levels} down blocks x {res} res, base {net.base} x {mults}; {att_s}"


def rows(channels: int) -> list[tuple[str, str, str, str, str]]:
    """(preset, kind, network inputs, parameters, notes) per preset."""
    out = []
    for name in list_presets():
        p = load_preset(name)
        net = build_network(p, channels)
        n = count_parameters(net)
        if p.kind == "stainnet":
            inputs = "3 (H&E RGB)"
        elif p.kind == "diffusion":
            extra = cond_channels(p, channels) - channels
            inputs = f"{channels} AF + {extra} prior + 3 noisy RGB" if extra else f"{channels} AF + 3 noisy RGB"
        else:
            inputs = f"{channels} AF"
        note = ""
        if p.kind == "pix2pix":
            dc, du = build_discriminators(p, channels)
            nc, nu = count_parameters(dc) / 1e6, count_parameters(du) / 1e6
            note = f"+ discriminators {nc:.2f}M (AF+RGB) and {nu:.2f}M (RGB)"
        if p.kind == "stainnet":
            s = p.stainnet
            note = f"{s.depth} conv blocks from {s.base_channels} ch, {s.feature_dim}-d features, {s.n_classes} classes"
        if isinstance(net, UNet):
            tile = 32 if name.startswith("tiny-") else 128
            time = "" if net.time_mlp is not None else "; no time input"
            note = unet_summary(net, tile) + time + (f"; {note}" if note else "")
        out.append((name, p.kind, inputs, f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k", note))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=26, help="AF channels (paper: 26)")
    args = ap.parse_args()
    print(f"AF channels: {args.channels}\n")
    print("| preset | kind | inputs | parameters | architecture |")
    print("|---|---|---|---|---|")
    for r in rows(args.channels):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
