"""Pairs manifest, tiling into the on-disk dataset, the torch dataset/sampler, and synth/ (phantom slides).

May import: base modules and io."""
