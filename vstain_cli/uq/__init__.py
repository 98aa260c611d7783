"""Uncertainty: credible intervals and risk control, calibrate, whole-slide interval maps.

May import: everything below it (base, io, data, diffusion, nets, train, infer)."""
