"""Tests of vstain_cli.infer.stitch: windows, canvas fusion, regions, noise, seam ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from vstain_cli.infer.stitch import (
    CanvasDenoiser,
    RegionBlender,
    blend_predictions,
    blend_regions,
    constant_fill,
    feather_weights,
    noise_canvas,
    region_generator,
    region_plan,
    seam_ratio,
    seam_ratio_axes,
    window_grid,
)

T = 1000
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # Ho et al. 2020 linear schedule


def ddim(model, x, cond, steps, eta=0.0, generator=None):
    """A tiny DDIM (Song et al. 2021, eq. 12) on an eps-model; eta = 1 is DDPM-like."""
    ts = np.linspace(T - 1, 0, steps).round().astype(int)
    for i, t in enumerate(ts):
        a = ABAR[t]
        a_prev = ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((x.shape[0],), int(t)), cond)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


def oracle_net(x, t, cond):
    """eps that points exactly at x0 = cond[:, :3]: DDIM then returns cond."""
    a = torch.as_tensor(ABAR, dtype=torch.float64)[t.long()].view(-1, 1, 1, 1)
    return ((x.double() - a.sqrt() * cond[:, :3].double()) / (1 - a).sqrt()).float()


_SPECTRA: dict[int, torch.Tensor] = {}


def gaussian_field_net(x, t, cond):
    """Exact eps for a smooth unit-variance Gaussian field, assuming the window is periodic.

    Posterior mean in Fourier space: E[x0 | x_t] = sqrt(a) S / (a S + 1 - a) X_t. The
    periodic assumption is wrong at window borders, like a real network's missing context.
    """
    w = x.shape[-1]
    if w not in _SPECTRA:
        f = np.fft.fftfreq(w)
        s = np.exp(-2 * (np.pi * 2.0) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
        _SPECTRA[w] = torch.as_tensor(s / s.mean(), dtype=torch.float32)
    s = _SPECTRA[w]
    a = torch.as_tensor(ABAR, dtype=torch.float32)[t.long()].view(-1, 1, 1, 1)
    x0 = torch.fft.ifft2(torch.fft.fft2(x) * (a.sqrt() * s / (a * s + 1 - a))).real
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def hwc(z: torch.Tensor) -> np.ndarray:
    return z[0].permute(1, 2, 0).numpy()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: threads only add synchronisation (10x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("h,w,win,ov", [(128, 128, 32, 8), (130, 77, 32, 10), (20, 50, 32, 8),
                                        (32, 32, 32, 0), (100, 100, 16, 15)])
def test_window_grid_covers_every_pixel(h, w, win, ov):
    grid = window_grid(h, w, win, ov)
    cover = np.zeros((max(h, win), max(w, win)), int)
    for y, x in grid:
        cover[y:y + win, x:x + win] += 1
    assert (cover[:h, :w] >= 1).all()
    ys, xs = sorted({y for y, _ in grid}), sorted({x for _, x in grid})
    assert ys[0] == 0 and xs[0] == 0
    assert ys[-1] == max(h - win, 0) and xs[-1] == max(w - win, 0)  # flush with the border
    assert all(b - a <= win - ov for a, b in zip(ys, ys[1:]))
    assert all(b - a <= win - ov for a, b in zip(xs, xs[1:]))


def test_window_grid_rejects_bad_overlap():
    with pytest.raises(ValueError):
        window_grid(64, 64, 32, 32)
    with pytest.raises(ValueError):
        window_grid(64, 64, 32, -1)


@pytest.mark.parametrize("win,ov", [(32, 8), (32, 16), (16, 5), (8, 0), (9, 7)])
def test_feather_weights_positive_and_partition_of_unity(win, ov):
    wt = feather_weights(win, ov)
    assert wt.shape == (win, win) and wt.dtype == np.float32
    assert (wt > 0).all() and wt.max() <= 1.0
    np.testing.assert_allclose(wt, wt.T)
    np.testing.assert_allclose(wt, wt[::-1, ::-1])
    if ov == 0:
        assert (wt == 1).all()
    if 2 * ov <= win:  # windows stepped by win - ov: weights sum to 1 away from the canvas edge
        stride = win - ov
        size = 4 * stride + ov
        den = np.zeros((size, size))
        for y, x in window_grid(size, size, win, ov):
            den[y:y + win, x:x + win] += wt
        np.testing.assert_allclose(den[ov:size - ov, ov:size - ov], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- canvas fusion


def identity_net(x, t, cond):
    assert x.shape[-2:] == cond.shape[-2:] and x.shape[-1] == x.shape[-2]
    return cond[:, :3] + 0.0 * x


@pytest.mark.parametrize("h,w", [(96, 96), (100, 77), (20, 50), (33, 129)])
@pytest.mark.parametrize("ov", [0, 8, 13])
def test_canvas_denoiser_identity_reproduces_input(h, w, ov):
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(2, 5, h, w, generator=g)
    x = torch.randn(2, 3, h, w, generator=g)
    model = CanvasDenoiser(identity_net, window=32, overlap=ov, batch_size=5)
    out = model(x, torch.tensor([10, 20]), cond)
    assert out.shape == (2, 3, h, w)
    torch.testing.assert_close(out, cond[:, :3], atol=1e-6, rtol=1e-6)
    assert model.windows_evaluated == 2 * len(window_grid(h, w, 32, ov))


def test_canvas_denoiser_is_multidiffusion_fusion():
    """Per-pixel weighted mean of window predictions (Bar-Tal et al. 2023, eq. 5), brute force."""

    def net(x, t, cond):  # depends on the whole window and on t: not pointwise
        return x * cond.mean(dim=(1, 2, 3), keepdim=True) + t.view(-1, 1, 1, 1).float()

    g = torch.Generator().manual_seed(1)
    h, w, win, ov = 70, 90, 32, 12
    x, cond = torch.randn(1, 3, h, w, generator=g), torch.rand(1, 4, h, w, generator=g)
    out = CanvasDenoiser(net, win, ov, batch_size=3)(x, torch.tensor(7), cond)
    wt = feather_weights(win, ov).astype(np.float64)
    num, den = np.zeros((3, h, w)), np.zeros((h, w))
    for y, xx in window_grid(h, w, win, ov):
        xw, cw = x[..., y:y + win, xx:xx + win], cond[..., y:y + win, xx:xx + win]
        num[:, y:y + win, xx:xx + win] += wt * net(xw, torch.tensor([7]), cw)[0].double().numpy()
        den[y:y + win, xx:xx + win] += wt
    np.testing.assert_allclose(out[0].numpy(), num / den, atol=1e-5)


def test_canvas_denoiser_equals_net_on_one_window():
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(1, 3, 32, 32, generator=g), torch.rand(1, 2, 32, 32, generator=g)
    t = torch.tensor([500])
    torch.testing.assert_close(CanvasDenoiser(gaussian_field_net, 32, 8)(x, t, cond),
                               gaussian_field_net(x, t, cond))


def test_ddim_oracle_on_canvas_reproduces_condition():
    g = torch.Generator().manual_seed(3)
    cond = torch.rand(1, 4, 75, 101, generator=g) * 2 - 1
    model = CanvasDenoiser(oracle_net, window=32, overlap=8, batch_size=8)
    out = ddim(model, torch.randn(1, 3, 75, 101, generator=g), cond, steps=10)
    torch.testing.assert_close(out, cond[:, :3], atol=1e-4, rtol=0)
    assert model.windows_evaluated == 10 * len(window_grid(75, 101, 32, 8))


def test_mask_skips_background_and_fill_leads_to_white():
    g = torch.Generator().manual_seed(4)
    h, w, win = 64, 128, 32
    cond = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = np.zeros((h, w), bool)
    mask[:, :40] = True  # tissue on the left only
    for prediction in ("eps", "v"):
        fill = constant_fill(1.0, ABAR, prediction)
        x_t, t = torch.randn(1, 3, h, w, generator=g), torch.tensor([300])
        a = float(ABAR[300])
        pred = fill(x_t, t)
        x0 = ((x_t - math.sqrt(1 - a) * pred) / math.sqrt(a) if prediction == "eps"
              else math.sqrt(a) * x_t - math.sqrt(1 - a) * pred)  # Salimans & Ho 2022, eq. 7
        torch.testing.assert_close(x0, torch.ones_like(x0), atol=1e-5, rtol=0)
    model = CanvasDenoiser(oracle_net, win, 8, mask=mask, fill=constant_fill(1.0, ABAR, "eps"))
    out = ddim(model, torch.randn(1, 3, h, w, generator=g), cond, steps=8)
    covered = model.coverage_mask(h, w)
    assert covered[:, :40].all() and not covered[:, 80:].any()
    assert model.windows_skipped > 0
    assert model.windows_evaluated + model.windows_skipped == 8 * len(window_grid(h, w, win, 8))
    cov = torch.from_numpy(covered)
    torch.testing.assert_close(out[0][:, cov], cond[0, :3][:, cov], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0][:, ~cov], torch.ones_like(out[0][:, ~cov]), atol=1e-4, rtol=0)


def test_blend_predictions_for_deterministic_models():
    g = torch.Generator().manual_seed(5)
    cond = torch.rand(1, 6, 90, 61, generator=g)
    out = blend_predictions(lambda c: c[:, 1:4] * 2, cond, window=32, overlap=10, batch_size=4)
    torch.testing.assert_close(out, cond[:, 1:4] * 2, atol=1e-6, rtol=1e-6)
    mask = np.zeros((90, 61), bool)
    mask[:20, :20] = True
    out = blend_predictions(lambda c: c[:, :3], cond, 32, 0, mask=mask)
    assert (out[..., 40:, 40:] == 1.0).all()
    torch.testing.assert_close(out[..., :20, :20], cond[:, :3, :20, :20])


# ----------------------------------------------------------------------------- regions


@pytest.mark.parametrize("h,w,region,margin,blend", [(150, 211, 64, 12, None), (130, 70, 50, 10, 0),
                                                     (40, 300, 64, 16, 16), (20, 20, 64, 8, None)])
def test_region_plan_geometry_and_partition_of_unity(h, w, region, margin, blend):
    win = 32
    plan = region_plan(h, w, region, margin, win, blend)
    owner = np.zeros((h, w), int)
    total = np.zeros((h, w))
    for r in plan:
        iy0, iy1, ix0, ix1 = r.inner
        oy0, oy1, ox0, ox1 = r.outer
        sy0, sy1, sx0, sx1 = r.support
        owner[iy0:iy1, ix0:ix1] += 1
        assert oy0 <= sy0 <= iy0 < iy1 <= sy1 <= oy1 and ox0 <= sx0 <= ix0 < ix1 <= sx1 <= ox1
        assert iy1 - iy0 <= region and ix1 - ix0 <= region
        assert oy1 - oy0 >= min(win, h) and ox1 - ox0 >= min(win, w)
        total[oy0:oy1, ox0:ox1] += r.weights()
    assert (owner == 1).all()  # inner boxes partition the slide
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # weights: partition of unity
    assert [r.index for r in plan] == list(range(len(plan)))


def test_region_plan_rejects_bad_parameters():
    with pytest.raises(ValueError):
        region_plan(100, 100, 64, 8, 32, blend=20)  # blend > 2 * margin
    with pytest.raises(ValueError):
        region_plan(100, 100, 0, 8, 32)
    with pytest.raises(ValueError):
        region_plan(100, 100, 10, 8, 32)  # 10 px regions, 16 px blend band


def test_region_blender_streams_in_order_and_matches_one_shot():
    h, w, c = 300, 170, 3
    plan = region_plan(h, w, region=64, margin=16, window=32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def process(r):  # region-dependent values, so the blend really mixes
        y0, y1, x0, x1 = r.outer
        base = np.sin(yy[y0:y1, x0:x1] / 7) + np.cos(xx[y0:y1, x0:x1] / 5) + r.index
        return np.stack([base, 2 * base, -base], axis=-1)

    num, den = np.zeros((h, w, c)), np.zeros((h, w))
    for r in plan:
        y0, y1, x0, x1 = r.outer
        num[y0:y1, x0:x1] += process(r) * r.weights()[..., None]
        den[y0:y1, x0:x1] += r.weights()
    one_shot = num / den[..., None]

    for strip_rows in (None, 16):
        blender = RegionBlender(h, w, c, plan, strip_rows=strip_rows)
        strips = []
        for r in plan:
            strips += blender.add(r, process(r))
        strips += blender.close()
        starts = [y for y, _ in strips]
        assert starts[0] == 0 and starts == sorted(starts)
        assert all(y + s.shape[0] == y2 for (y, s), y2 in zip(strips, starts[1:] + [h]))
        if strip_rows:
            assert all(s.shape[0] % strip_rows == 0 for _, s in strips[:-1])
        np.testing.assert_allclose(np.concatenate([s for _, s in strips]), one_shot, atol=1e-5)
        # memory: never more than ~2 region rows (+ a strip) of the slide
        assert blender.peak_rows <= 2 * (64 + 2 * 16) + (strip_rows or 0) < h


def test_region_blender_rejects_out_of_order():
    plan = region_plan(100, 100, 40, 8, 16)
    blender = RegionBlender(100, 100, 1, plan)
    with pytest.raises(ValueError):
        blender.add(plan[1], np.zeros((*plan[1].shape, 1)))
    blender.add(plan[0], np.zeros((*plan[0].shape, 1)))
    with pytest.raises(ValueError):
        blender.close()


@pytest.mark.parametrize("h,w,region,margin,ov", [(150, 211, 64, 12, 8), (97, 97, 48, 16, 13)])
def test_streamed_oracle_diffusion_reproduces_slide(h, w, region, margin, ov):
    """Regions sampled on counter-based noise with a canvas DDIM, blended, streamed: exact."""
    rng = np.random.default_rng(6)
    cond = (rng.random((4, h, w), dtype=np.float32) * 2 - 1)
    plan = region_plan(h, w, region, margin, window=32)
    model = CanvasDenoiser(oracle_net, 32, ov, batch_size=8)

    def process(r):
        y0, y1, x0, x1 = r.outer
        x_t = torch.from_numpy(noise_canvas(7, y0, x0, y1 - y0, x1 - x0))[None]
        c = torch.from_numpy(cond[:, y0:y1, x0:x1])[None]
        return hwc(ddim(model, x_t, c, steps=5))

    strips = list(blend_regions(plan, ((r, process(r)) for r in plan), h, w, 3, strip_rows=8))
    assert all(len(s) % 8 == 0 for _, s in strips[:-1])
    out = np.concatenate([s for _, s in strips])
    np.testing.assert_allclose(out, cond[:3].transpose(1, 2, 0), atol=1e-4)


def test_streaming_with_shared_noise_agrees_with_one_shot_joint_sampling():
    """Counter-based noise: a region's sample is the one-shot canvas sample up to context."""
    h = w = 160
    plan = region_plan(h, w, region=80, margin=24, window=32)
    model = CanvasDenoiser(gaussian_field_net, 32, 16, batch_size=64)
    full = hwc(ddim(model, torch.from_numpy(noise_canvas(3, 0, 0, h, w))[None], None, 10))

    def process(r):
        y0, y1, x0, x1 = r.outer
        return hwc(ddim(model, torch.from_numpy(noise_canvas(3, y0, x0, y1 - y0, x1 - x0))[None], None, 10))

    streamed = np.concatenate([s for _, s in blend_regions(plan, ((r, process(r)) for r in plan), h, w, 3)])
    rel = np.abs(streamed - full).mean() / full.std()
    assert rel < 0.05, rel
    assert seam_ratio(streamed, 80) < 1.15


# ----------------------------------------------------------------------------- noise


def test_noise_canvas_is_counter_based_and_gaussian():
    big = noise_canvas(11, 0, 0, 96, 128, channels=3)
    part = noise_canvas(11, 30, 45, 40, 50, channels=3)
    np.testing.assert_array_equal(part, big[:, 30:70, 45:95])  # same pixels, same noise
    assert big.dtype == np.float32 and big.shape == (3, 96, 128)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    assert abs(np.corrcoef(big[0, :, 1:].ravel(), big[0, :, :-1].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(big[0].ravel(), big[1].ravel())[0, 1]) < 0.02
    assert not np.array_equal(big, noise_canvas(12, 0, 0, 96, 128))
    assert not np.array_equal(big, noise_canvas(11, 0, 0, 96, 128, step=1))
    a = torch.randn(4, generator=region_generator(1, 2))
    assert torch.equal(a, torch.randn(4, generator=region_generator(1, 2)))
    assert not torch.equal(a, torch.randn(4, generator=region_generator(1, 3)))


# ----------------------------------------------------------------------------- seams


def test_seam_ratio_smooth_vs_tiled():
    rng = np.random.default_rng(0)
    smooth = gaussian_filter(rng.normal(size=(256, 256, 3)), (3, 3, 0))  # a smooth random field
    assert abs(seam_ratio(smooth, 32) - 1) < 0.1
    offsets = np.kron(rng.normal(0, 1, (8, 8)), np.ones((32, 32))) * smooth.std()
    tiled = smooth + offsets[..., None]  # each 32 px tile shifted by its own constant
    assert seam_ratio(tiled, 32) > 3
    rows, cols = seam_ratio_axes(tiled, 32)
    assert rows > 3 and cols > 3
    # vertical tile borders only (per-column-band offsets): rows ~1, cols > 3
    stripes = smooth + np.kron(rng.normal(0, 1, 8), np.ones(32))[None, :, None] * smooth.std()
    rows, cols = seam_ratio_axes(stripes, 32)
    assert abs(rows - 1) < 0.1 and cols > 3
    # tiles starting at (5, 5): found with offset=5, not at the default offset
    shifted = np.roll(tiled, 5, axis=(0, 1))
    assert seam_ratio(shifted, 32, offset=5) > 3 and seam_ratio(shifted, 32) < 1.0
    assert seam_ratio(smooth, (32, 64), (0, 16)) == pytest.approx(
        seam_ratio(smooth[:, 16:], (32, 64)), rel=0.2)
    assert seam_ratio(np.zeros((64, 64, 3)), 32) == 1.0
    assert math.isnan(seam_ratio(np.ones((16, 16)), 32))  # no border line inside


def test_joint_denoising_removes_seams_of_independent_tiles():
    h = w = 128
    win = 32
    for eta in (0.0, 1.0):  # DDIM and DDPM-like ancestral sampling
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(1, 3, h, w, generator=g)
        joint = CanvasDenoiser(gaussian_field_net, win, 16, batch_size=64)
        j = ddim(joint, x_T, None, 20, eta, torch.Generator().manual_seed(1))
        tiles = torch.zeros_like(j)
        for k, (y, x) in enumerate(window_grid(h, w, win, 0)):
            gk = torch.Generator().manual_seed(100 + k)  # independent tiles, own noise
            tiles[..., y:y + win, x:x + win] = ddim(
                gaussian_field_net, torch.randn(1, 3, win, win, generator=gk), None, 20, eta, gk)
        r_joint, r_tiles = seam_ratio(hwc(j), win), seam_ratio(hwc(tiles), win)
        assert r_tiles > 2.0 and r_joint < 1.15, (r_tiles, r_joint)
        assert 0.7 < float(j.std()) < 1.2  # a real sample, not a blur of it


# ----------------------------------------------------------------------------- with the project's samplers


def test_canvas_denoiser_plugs_into_project_samplers():
    samplers = pytest.importorskip("vstain_cli.diffusion.samplers")
    schedule_mod = pytest.importorskip("vstain_cli.diffusion.schedule")
    schedule = schedule_mod.Schedule.make("linear", T)
    np.testing.assert_allclose(schedule.alphas_cumprod, ABAR)
    g = torch.Generator().manual_seed(8)
    cond = torch.rand(1, 4, 70, 90, generator=g) * 1.8 - 0.9
    for name in ("ddim", "ddpm", "dpmpp-2m"):
        model = CanvasDenoiser(oracle_net, 32, 8, batch_size=16)
        out = samplers.sample(model, torch.randn(1, 3, 70, 90, generator=g), schedule, cond,
                              sampler=name, steps=6, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, cond[:, :3], atol=1e-4, rtol=0)
    # seams: DDPM ancestral sampling, joint canvas vs independent tiles
    h = w = 128
    win = 32
    joint = CanvasDenoiser(gaussian_field_net, win, 16, batch_size=64)
    j = samplers.sample(joint, torch.randn(1, 3, h, w, generator=g), schedule, None, sampler="ddpm",
                        steps=20, clip_x0=False, generator=torch.Generator().manual_seed(2))
    tiles = torch.zeros_like(j)
    for k, (y, x) in enumerate(window_grid(h, w, win, 0)):
        gk = torch.Generator().manual_seed(200 + k)
        tiles[..., y:y + win, x:x + win] = samplers.sample(
            gaussian_field_net, torch.randn(1, 3, win, win, generator=gk), schedule, None,
            sampler="ddpm", steps=20, clip_x0=False, generator=gk)
    r_joint, r_tiles = seam_ratio(hwc(j), win), seam_ratio(hwc(tiles), win)
    assert r_tiles > 2.0 and r_joint < 1.15, (r_tiles, r_joint)


def test_canvas_denoiser_keeps_the_network_dtype():
    g = torch.Generator().manual_seed(9)
    cond = torch.rand(1, 3, 40, 50, generator=g, dtype=torch.float64)
    out = CanvasDenoiser(identity_net, 32, 8)(torch.zeros(1, 3, 40, 50, dtype=torch.float64), 5, cond)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, cond, atol=1e-12, rtol=0)
    half = CanvasDenoiser(lambda x, t, c: c.to(torch.bfloat16), 32, 8)(cond.float(), 5, cond.float())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), cond.float(), atol=1e-2, rtol=0)
