"""Training: presets, objectives per model kind, the one loop, run folders, checkpoints, EMA, precision, DDP.

May import: base modules, io, data, diffusion, nets."""
