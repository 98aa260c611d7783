"""Inference: loading a trained run, the whole-slide machinery shared by stain and uncertainty, stain, stitch/.

May import: base modules, io, data, diffusion, nets, train (presets and run-folder names only)."""
