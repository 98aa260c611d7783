"""Noise schedules, the denoiser wrapper (prediction parameterisation), losses, the masked prior, samplers.

May import: base modules only. Never presets (train/): presets validate their names against this package."""
