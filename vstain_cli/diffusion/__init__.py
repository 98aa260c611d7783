"""Noise schedules, training losses and samplers; the network never owns the process."""
