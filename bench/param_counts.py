"""Print the parameter count of every bundled preset (a markdown table).

Usage: python bench/param_counts.py [--channels 26]

The counts depend on the AF channel count only through the first conv (and the
conditional discriminator); the paper has 26 channels.
"""

from __future__ import annotations

import argparse

from vstain_cli.train.networks import build_discriminators, build_network, cond_channels, count_parameters
from vstain_cli.train.presets import list_presets, load_preset


def rows(channels: int) -> list[tuple[str, str, str, str, str]]:
    """(preset, kind, network inputs, parameters, notes) per preset."""
    out = []
    for name in list_presets():
        p = load_preset(name)
        n = count_parameters(build_network(p, channels))
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
        if p.model is not None:
            m = p.model
            att = f"attn levels {m.attention_levels} x{m.attention_heads}h" + (" + mid" if m.mid_attention else "")
            note = f"base {m.base_channels} x {m.channel_mults}, {att}" + (f"; {note}" if note else "")
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
