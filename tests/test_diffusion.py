"""Noise schedules, the forward process, losses and the B/R masked prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vstain_cli.diffusion.denoiser import Denoiser, to_x0_eps, training_target
from vstain_cli.diffusion.losses import diffusion_loss, pixel_loss
from vstain_cli.diffusion.prior import empty_prior, random_rect_prior
from vstain_cli.diffusion.schedule import Schedule, make_betas
from vstain_cli.train.presets import load_preset


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine-beta"])
def test_schedules_are_valid(name):
    s = Schedule.make(name, 1000)
    ac = s.alphas_cumprod
    assert s.T == 1000 and s.betas.dtype == np.float64
    assert np.all(s.betas > 0) and np.all(s.betas < 1)
    assert np.all(np.diff(ac) < 0)
    assert ac[0] > 0.99 and ac[-1] < 1e-3  # starts clean, ends (nearly) pure noise


def test_schedule_end_points():
    lin = make_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    cb = make_betas("cosine-beta", 1000)
    assert cb[0] == pytest.approx(1e-4) and cb[-1] == pytest.approx(0.02)
    assert np.all(np.diff(cb) >= 0) and cb[100] < lin[100]  # slower start than linear
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_is_nichol_dhariwal_closed_form(T):
    # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1+s)) pi/2), s = 0.008,
    # beta_t = 1 - abar(t)/abar(t-1) clipped at 0.999. Our t is 0-based: abar_t = abar(t + 1).
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    s = Schedule.make("cosine", T, beta_start=0.3, beta_end=0.4)  # the beta range plays no part
    closed = np.array([f(t + 1) / f(0) for t in range(T)])
    raw = 1 - closed / np.concatenate([[1.0], closed[:-1]])
    assert np.all(s.betas <= 0.999) and s.betas[-1] == 0.999 and raw[-1] > 0.999
    np.testing.assert_allclose(s.betas[:-1], raw[:-1], rtol=1e-9, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod[:-1], closed[:-1], rtol=1e-9, atol=0)
    assert s.alphas_cumprod[-1] == pytest.approx(closed[-2] * 0.001, rel=1e-9)


def test_schedules_at_mid_chain_and_paper_presets():
    # docs/models.md (bench/schedules.py): abar at t = 500 of the three readings of the paper's sentence
    abar = {n: Schedule.make(n, 1000).alphas_cumprod[500] for n in ("cosine", "linear", "cosine-beta")}
    assert abar["cosine"] == pytest.approx(0.492, abs=1e-3)
    assert abar["linear"] == pytest.approx(0.078, abs=1e-3)
    assert abar["cosine-beta"] == pytest.approx(0.154, abs=1e-3)
    for name in ("diffusion-b", "diffusion-l", "diffusion-br"):
        sched = load_preset(name).diffusion.build_schedule()
        np.testing.assert_array_equal(sched.betas, Schedule.make("cosine", 1000).betas)


def test_q_sample_statistics():
    s = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4000, 1, 1, 1), 0.5)
    t = torch.full((4000,), 300)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    a = s.alphas_cumprod[300]
    assert float(xt.mean()) == pytest.approx(math.sqrt(a) * 0.5, abs=0.03)
    assert float(xt.std()) == pytest.approx(math.sqrt(1 - a), abs=0.03)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(prediction):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.01]).reshape(3, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = training_target(x0, eps, abar, prediction)
    x0_hat, eps_hat = to_x0_eps(pred, xt, abar, prediction)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_diffusion_loss_zero_for_oracle_and_deterministic(prediction):
    s = Schedule.make("cosine-beta", 1000)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1

    def oracle(x_t, t, cond):  # recovers the target exactly from x_t and the known x0
        a = s.abar(t.long(), x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(x0, eps, a, prediction)

    loss = diffusion_loss(Denoiser(oracle, prediction), x0, None, s, generator=torch.Generator().manual_seed(3))
    assert float(loss) < 1e-8
    zero = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    l1 = diffusion_loss(zero, x0, None, s, generator=torch.Generator().manual_seed(3))
    l2 = diffusion_loss(zero, x0, None, s, generator=torch.Generator().manual_seed(3))
    assert float(l1) == float(l2) and 0.5 < float(l1) < 2.0  # E[eps^2] = 1


def test_pixel_loss():
    a, b = torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert float(pixel_loss(a, b, "l1")) == 1.0
    assert float(pixel_loss(a, b, "l2")) == 1.5
    with pytest.raises(ValueError):
        pixel_loss(a, b, "huber")


def test_random_rect_prior():
    x0 = torch.rand(64, 3, 16, 16) + 1.0  # strictly positive
    p = random_rect_prior(x0, torch.Generator().manual_seed(0), 0.25, 0.5, empty_prob=0.25)
    assert p.shape == (64, 4, 16, 16)
    mask = p[:, 3:]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(p[:, :3], x0 * mask)
    frac = mask.mean(dim=(1, 2, 3))
    empty = int((frac == 0).sum())
    assert 5 <= empty <= 30  # ~25% fully masked
    given = frac[frac > 0]
    assert float(given.min()) >= 0.25**2 * 0.7 and float(given.max()) <= 0.5**2 * 1.3
    for i in torch.nonzero(frac > 0).flatten()[:5]:  # one axis-aligned rectangle
        ys, xs = torch.nonzero(mask[i, 0], as_tuple=True)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    again = random_rect_prior(x0, torch.Generator().manual_seed(0), 0.25, 0.5, empty_prob=0.25)
    assert torch.equal(p, again)
    assert torch.count_nonzero(empty_prior(x0)) == 0 and empty_prior(x0).shape == (64, 4, 16, 16)
