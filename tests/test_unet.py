"""The UNet, discriminator and StainNet networks."""

from __future__ import annotations

import pytest
import torch

from vstain_cli.nets.discriminator import PatchDiscriminator
from vstain_cli.nets.stainnet import StainNet
from vstain_cli.nets.unet import Attention, ResBlock, UNet, timestep_embedding

torch.set_num_threads(1)


def small(**kw):
    args = dict(in_channels=7, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_levels=(1,), attention_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return UNet(**args)


def test_shapes_and_conditioning_concat():
    net = small()
    x, c, t = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([0.0, 999.0])
    assert net(x, t, c).shape == (2, 3, 16, 16)
    # cond is concatenated in front of x: same as passing the concatenation alone
    torch.testing.assert_close(net(x, t, c), net(torch.cat([c, x], 1), t))
    with pytest.raises(ValueError, match="input channels"):
        net(x, t, torch.randn(2, 5, 16, 16))
    with pytest.raises(ValueError, match="timesteps"):
        net(x, None, c)


def test_any_spatial_size_is_padded_and_cropped():
    net = small(channel_mults=(1, 2, 2))
    x, c = torch.randn(1, 3, 13, 22), torch.randn(1, 4, 13, 22)
    assert net(x, torch.tensor([5.0]), c).shape == (1, 3, 13, 22)
    assert net(x, torch.tensor(5.0), c).shape == (1, 3, 13, 22)  # scalar t broadcasts


def test_output_is_zero_at_init_and_learns_something():
    net = small()
    x, c, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3.0, 4.0])
    assert torch.count_nonzero(net(x, t, c)) == 0  # zero-initialised last conv (guided-diffusion)
    net(x, t, c).sum().backward()
    assert net.out_conv.weight.grad.abs().sum() > 0


def test_time_embedding_changes_output_and_can_be_off():
    net = small()
    with torch.no_grad():
        for p in net.parameters():  # leave the zero initialisation behind
            p.add_(0.1 * torch.randn_like(p))
    x, c = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1.0]), c), net(x, torch.tensor([900.0]), c))
    reg = small(in_channels=4, time_embedding=False)
    assert reg.time_mlp is None
    assert reg(torch.randn(2, 4, 8, 8)).shape == (2, 3, 8, 8)
    assert sum(p.numel() for p in reg.parameters()) < sum(p.numel() for p in small(in_channels=4).parameters())


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    att = Attention(8, heads=2)
    with torch.no_grad():
        att.out.weight.copy_(torch.eye(8)[:, :, None, None])
    x = torch.randn(1, 8, 3, 3)
    qkv = att.qkv(att.norm(x)).reshape(1, 3, 2, 4, 9)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (1, heads, d, N)
    w = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / 2.0, dim=-1)
    ref = torch.einsum("bhnm,bhdm->bhdn", w, v).reshape(1, 8, 3, 3)
    torch.testing.assert_close(att(x), x + ref, atol=1e-5, rtol=1e-5)


def test_channels_last_same_result():
    net = small().eval()
    x, c, t = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ref = net(x, t, c)
        cl = net.to(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last), t, c.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def _trace(net, size, t=True):
    """Forward a (1, C, size, size) input; the spatial size every module of interest saw."""
    seen = {"down": [], "res": [], "mid": [], "up": [], "attn": []}
    hooks = []
    for blk in net.down:
        hooks.append(blk.down.register_forward_hook(lambda m, i, o: seen["down"].append(o.shape[-1])))
    for blk in net.up:
        hooks.append(blk.up.register_forward_hook(lambda m, i, o: seen["up"].append(o.shape[-1])))
    hooks.append(net.mid1.register_forward_hook(lambda m, i, o: seen["mid"].append(o.shape[-1])))
    for m in net.modules():
        if isinstance(m, ResBlock):
            hooks.append(m.register_forward_hook(lambda m, i, o: seen["res"].append(o.shape[-1])))
        if isinstance(m, Attention):
            hooks.append(m.register_forward_hook(lambda m, i, o: seen["attn"].append((o.shape[-1], m.heads))))
    x = torch.randn(1, net.in_channels, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([10.0]) if t else None)
    for h in hooks:
        h.remove()
    assert out.shape == (1, 3, size, size)
    return seen


def test_sec41_layout_six_down_and_six_up_blocks():
    # Sec. 4.1: six down blocks (two residual layers + a downsampling conv each), six mirrored
    # up blocks with skip connections, the time embedding in every residual block.
    net = small(in_channels=5, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=(3,),
                attention_heads=1)
    assert len(net.down) == 6 and len(net.up) == 6 and net.multiple == 64
    for blk in net.down:
        assert len(blk.res) == 2 and blk.down.stride == (2, 2) and blk.down.kernel_size == (3, 3)
    assert all(len(blk.res) == 2 for blk in net.up)
    res = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(res) == 6 * 2 + 2 + 6 * 2 and all(r.temb is not None for r in res)
    seen = _trace(net, 128)
    assert seen["down"] == [64, 32, 16, 8, 4, 2] and seen["mid"] == [2] and seen["up"] == [4, 8, 16, 32, 64, 128]
    sizes = [128, 64, 32, 16, 8, 4, 2]  # down blocks, middle, then the up blocks back to 128
    assert seen["res"] == [r for r in sizes + sizes[-2::-1] for _ in range(2)]
    assert seen["attn"] == [(16, 1)]  # exactly one layer, in the down block at 16x16
    # mirrored skips: up residual layer j takes (h, output of down residual layer 1 - j)
    for d, u in zip(net.down, reversed(net.up), strict=True):
        assert u.res[0].conv1.in_channels == u.up.out_channels + d.res[1].conv1.out_channels
        assert u.res[1].conv1.in_channels == u.res[0].conv1.out_channels + d.res[0].conv1.out_channels


def test_attention_placement_levels_middle_and_up():
    net = small(channel_mults=(1, 2, 2), attention_levels=(0, 3), attention_heads=2, attention_up=True)
    seen = _trace(net, 32)
    # level 0 in the down block, the middle (level 3 = 4 px), level 0 again in the mirrored up block
    assert seen["attn"] == [(32, 2), (4, 2), (32, 2)]
    assert isinstance(net.mid_attn, Attention)
    with pytest.raises(ValueError, match="attention_levels"):
        small(channel_mults=(1, 2), attention_levels=(3,))


def test_regression_backbone_is_the_same_without_time():
    kw = dict(in_channels=4, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=(3,),
              attention_heads=1)
    diff, reg = small(**kw), small(time_embedding=False, **kw)
    names = lambda n: {k for k, _ in n.named_parameters() if "temb" not in k and "time_mlp" not in k}  # noqa: E731
    assert names(diff) == names(reg) and reg.time_mlp is None
    assert _trace(reg, 128, t=False)["attn"] == [(16, 1)]


def test_patch_discriminator_and_stainnet():
    d = PatchDiscriminator(7, 8, layers=2)
    assert d(torch.randn(2, 7, 32, 32)).shape[:2] == (2, 1)
    s = StainNet(n_classes=4, base_channels=4, depth=3, feature_dim=16)
    x = torch.randn(3, 3, 32, 32)
    assert s(x).shape == (3, 4)
    assert s.features(x).shape == (3, 16)
    s.eval()
    torch.testing.assert_close(s.head(s.features(x)), s(x))
