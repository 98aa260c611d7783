"""Samplers: oracle recovery, determinism, DDIM/DDPM relations, DPM-Solver++.

Registry-wide properties are parametrised over ``SAMPLERS``: a new sampler is tested by registering it."""

from __future__ import annotations

import pytest
import torch

from vstain_cli.diffusion.denoiser import Denoiser, training_target
from vstain_cli.diffusion.samplers import SAMPLERS, default_steps, sample, timesteps
from vstain_cli.diffusion.schedule import Schedule

SCHED = Schedule.make("cosine-beta", 1000)


def oracle_for(x0: torch.Tensor, prediction: str = "eps"):
    """A denoiser whose network returns the true eps, v or x0 of x_t for a known x0."""

    def model(x_t, t, cond):
        a = SCHED.abar(t.long(), x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(x0, eps, a, prediction)

    return Denoiser(model, prediction)


def toy_model(x_t, t, cond):
    """A fixed smooth 'network' (not an oracle) using the conditioning."""
    return torch.tanh(0.5 * x_t + 0.1 * cond.mean(1, keepdim=True) + t.reshape(-1, 1, 1, 1) / 1000.0)


def x0_target():
    g = torch.Generator().manual_seed(7)
    return torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8


def test_timesteps_trailing():
    assert timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = timesteps(1000, 10)
    assert ts[0] == 999 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert ts[-1] == 99
    with pytest.raises(ValueError):
        timesteps(1000, 0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [10, 1000])
def test_oracle_recovers_x0(sampler, steps, prediction):
    x0 = x0_target()
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = sample(oracle_for(x0, prediction), x_T, SCHED, None, sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_registry_defaults_and_one_signature(sampler):
    spec = SAMPLERS[sampler]
    assert 1 <= default_steps(sampler, 1000) <= 1000 and spec.summary
    seen = []
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = spec.fn(Denoiser(toy_model), x_T, Schedule.make("linear", 100), torch.zeros(1, 1, 4, 4), steps=4, eta=0.0,
                  clip_x0=True, generator=torch.Generator().manual_seed(1),
                  callback=lambda i, n, x: seen.append((i, n)))
    assert out.shape == x_T.shape and seen == [(i, 4) for i in range(4)]
    assert default_steps(sampler, 10) <= 10  # never more steps than the schedule has


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_seed_same_output_bit_for_bit(sampler):
    cond = torch.randn(2, 4, 8, 8)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        x_T = torch.randn((2, 3, 8, 8), generator=g)
        runs.append(sample(toy_model, x_T, SCHED, cond, sampler=sampler, steps=25, eta=1.0, generator=g))
    assert torch.equal(runs[0], runs[1])
    g = torch.Generator().manual_seed(124)
    x_T = torch.randn((2, 3, 8, 8), generator=g)
    other = sample(toy_model, x_T, SCHED, cond, sampler=sampler, steps=25, generator=g)
    assert not torch.equal(runs[0], other)


def test_ddim_eta0_is_deterministic_given_x_T():
    cond = torch.randn(1, 4, 8, 8)
    x_T = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    a = sample(toy_model, x_T, SCHED, cond, sampler="ddim", steps=1000, generator=torch.Generator().manual_seed(1))
    b = sample(toy_model, x_T, SCHED, cond, sampler="ddim", steps=1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # the deterministic path ignores the generator


def test_ddim_eta1_equals_ddpm():
    # DDIM with eta = 1 has the DDPM posterior variance (Song et al. 2021, sec. 4.1).
    cond = torch.randn(2, 4, 8, 8)
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed
    a = sample(toy_model, x_T, SCHED, cond, sampler="ddim", steps=40, eta=1.0, generator=gen(3))
    b = sample(toy_model, x_T, SCHED, cond, sampler="ddpm", steps=40, generator=gen(3))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dpmpp_converges_to_fine_ddim():
    # Few DPM-Solver++(2M) steps land closer to the 1000-step deterministic ODE
    # solution than as many DDIM steps do (2nd vs 1st order).
    cond = torch.randn(1, 4, 8, 8)
    x_T = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(11))
    kw = dict(clip_x0=False)
    ref = sample(toy_model, x_T, SCHED, cond, sampler="ddim", steps=1000, **kw)
    dpm = sample(toy_model, x_T, SCHED, cond, sampler="dpmpp-2m", steps=15, **kw)
    ddim = sample(toy_model, x_T, SCHED, cond, sampler="ddim", steps=15, **kw)
    assert (dpm - ref).abs().mean() < (ddim - ref).abs().mean()


def test_callback_and_errors():
    seen = []
    x_T = torch.randn(1, 3, 4, 4)
    sample(toy_model, x_T, SCHED, torch.zeros(1, 1, 4, 4), steps=5,
           callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert [s[:2] for s in seen] == [(i, 5) for i in range(5)]
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(toy_model, x_T, SCHED, None, sampler="euler")
