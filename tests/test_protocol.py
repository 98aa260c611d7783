"""Sampling protocols (``--protocol``): what each runs, and how a number records it."""

from __future__ import annotations

import pytest

from vstain_cli.diffusion.samplers import effective_eta, protocol_label, protocol_record, resolve_protocol


def test_fast_runs_the_flags_given_and_paper_runs_ddpm_over_T():
    assert resolve_protocol("fast", "dpmpp-2m", 20, 0.0) == ("dpmpp-2m", 20, 0.0)
    assert resolve_protocol("paper", "ddim", None, 0.0) == ("ddpm", None, 1.0)
    assert protocol_record("paper", "ddpm", None, 1.0, 1000) == {"protocol": "paper", "sampler": "ddpm",
                                                                  "steps": 1000, "eta": 1.0}
    assert protocol_record("fast", "ddim", None, 0.0, 1000)["steps"] == 50  # the registry's default
    assert protocol_record("fast", "ddim", None, 0.0, 30)["steps"] == 30


def test_conflicts_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="drop --steps 50"):
        resolve_protocol("paper", "ddim", 50, 0.0)
    with pytest.raises(ValueError, match="drop --sampler dpmpp-2m"):
        resolve_protocol("paper", "dpmpp-2m", None, 0.0)
    with pytest.raises(ValueError, match="unknown protocol 'slow'"):
        resolve_protocol("slow", "ddim", None, 0.0)


def test_effective_eta_and_labels():
    assert effective_eta("ddpm", 0.0) == 1.0  # DDPM = DDIM with eta 1
    assert effective_eta("ddim", 0.5) == 0.5 and effective_eta("dpmpp-2m", 0.7) == 0.0  # deterministic solver
    assert protocol_label({"protocol": "fast", "sampler": "ddim", "steps": 50, "eta": 0.0}) == "DDIM-50, eta 0"
    assert protocol_label({"protocol": "paper", "sampler": "ddpm", "steps": 1000, "eta": 1.0}) == \
        "DDPM-1000, eta 1 (paper)"
