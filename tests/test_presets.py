"""Preset registry: loading by name or path, validation, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from train_helpers import micro_dict, write_preset

from vstain_cli.errors import InputError
from vstain_cli.train.networks import build_discriminators, build_network, cond_channels, count_parameters
from vstain_cli.train.presets import Preset, list_presets, load_preset

PAPER = ["diffusion-b", "diffusion-l", "diffusion-br", "regression", "pix2pix", "stainnet"]
TINY = ["tiny-diffusion", "tiny-diffusion-l", "tiny-diffusion-br", "tiny-regression", "tiny-pix2pix", "tiny-stainnet"]


def test_all_presets_listed_and_load():
    names = list_presets()
    assert set(PAPER + TINY) <= set(names)
    for n in names:
        p = load_preset(n)
        assert p.name == n and p.source == f"models/{n}.toml"
        assert Preset.from_dict(p.to_dict()) == p  # round trip through config.json's form


def test_paper_architectures():
    b, lg, br = load_preset("diffusion-b"), load_preset("diffusion-l"), load_preset("diffusion-br")
    for p in (b, lg, br, load_preset("regression"), load_preset("pix2pix")):
        assert p.model.channel_mults == [1, 1, 2, 2, 4, 4] and p.model.num_res_blocks == 2  # six down blocks
    assert b.model.attention_levels == [3] and b.model.attention_heads == 1 and not b.model.attention_up
    assert lg.model.attention_levels == [1, 2, 3, 4, 5, 6] and lg.model.attention_heads == 2
    assert br.model == b.model and br.diffusion.prior and not b.diffusion.prior
    for p in (b, lg, br):  # Nichol & Dhariwal's cosine (test_diffusion checks it against the closed form)
        assert p.diffusion.schedule == "cosine" and p.diffusion.timesteps == 1000
        assert p.train.batch_size == 16 and p.train.lr == 1e-5
    assert cond_channels(br, 26) == 30 and cond_channels(b, 26) == 26


def _attention_calls(preset: str, monkeypatch, size: int) -> tuple[list[tuple[int, int]], int]:
    """(tokens, heads) of every scaled_dot_product_attention call of one forward, and the down blocks.

    The preset's layout at a quarter of its width (the layout, not the width, is under test; seconds on a CPU).
    """
    p = load_preset(preset)
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, base_channels=p.model.base_channels // 4))
    torch.manual_seed(0)
    net = build_network(p, 2).eval()
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[-2], q.shape[1]))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(1, net.in_channels, size, size)
    with torch.no_grad():
        net(x, torch.tensor([500.0]) if p.kind == "diffusion" else None)
    return calls, len(net.down)


def test_paper_presets_build_the_sec41_network(monkeypatch):
    # Diffusion-B (and B/R, and the regression / pix2pix backbones): one single-head layer at 16x16.
    for name in ("diffusion-b", "diffusion-br", "regression", "pix2pix"):
        calls, downs = _attention_calls(name, monkeypatch, 128)
        assert downs == 6 and calls == [(16 * 16, 1)], name
    # Diffusion-L: global 2-head attention at every downsampled resolution, 64x64 (4,096 tokens) to 2x2.
    calls, downs = _attention_calls("diffusion-l", monkeypatch, 128)
    assert downs == 6 and calls == [(r * r, 2) for r in (64, 32, 16, 8, 4, 2)]
    # The tiny presets keep three down blocks (32 px tiles): the same layout, scaled down.
    calls, downs = _attention_calls("tiny-diffusion", monkeypatch, 32)
    assert downs == 3 and calls == [(8 * 8, 1)]
    calls, downs = _attention_calls("tiny-diffusion-l", monkeypatch, 32)
    assert downs == 3 and calls == [(r * r, 2) for r in (16, 8, 4)]


def test_parameter_counts():
    n_l = count_parameters(build_network(load_preset("diffusion-l"), 26))
    n_b = count_parameters(build_network(load_preset("diffusion-b"), 26))
    n_r = count_parameters(build_network(load_preset("regression"), 26))
    assert 20e6 < n_r < n_b < n_l < 26e6  # docs/models.md: 22.17M, 23.31M, 24.18M
    dc, du = build_discriminators(load_preset("pix2pix"), 26)
    assert count_parameters(dc) > count_parameters(du) > 1e6
    assert count_parameters(build_network(load_preset("tiny-diffusion"), 4)) < 1e6


def test_run_config_of_the_old_unet_is_refused_clearly():
    # config.json of a run made before the sec. 4.1 UNet always holds [model] mid_attention.
    d = load_preset("diffusion-l").to_dict()
    d["model"]["mid_attention"] = True
    d["model"].pop("attention_up")
    with pytest.raises(InputError) as e:
        Preset.from_dict(d, source="runs/old/config.json")
    msg = str(e.value)
    assert "runs/old/config.json" in msg and "mid_attention" in msg and "retrain" in msg
    d = load_preset("diffusion-b").to_dict()
    d["model"]["attention_levels"] = [1, 1]
    with pytest.raises(InputError, match="twice"):
        Preset.from_dict(d)


def test_unknown_preset_lists_available():
    with pytest.raises(InputError) as e:
        load_preset("diffusion-xl")
    assert "diffusion-xl" in str(e.value) and "diffusion-b" in str(e.value) and "tiny-stainnet" in str(e.value)


def test_load_by_path_and_errors_name_the_file(tmp_path):
    good = write_preset(tmp_path / "mine.toml", micro_dict())
    assert load_preset(good).model.base_channels == 8
    assert load_preset(str(good)).source == str(good)
    cases = {
        "unknown key": ({"model": {"base_chanels": 8}}, "base_chanels"),
        "bad type": ({"train": {"steps": "ten"}}, "train.steps"),
        "bad value": ({"diffusion": {"schedule": "quadratic"}}, "schedule"),
        "bad level": ({"model": {"attention_levels": [7]}}, "attention_levels"),
    }
    for i, (sections, needle) in enumerate(cases.values()):
        d = micro_dict()
        for sec, vals in sections.items():
            d[sec].update(vals)
        path = write_preset(tmp_path / f"bad{i}.toml", d)
        with pytest.raises(InputError) as e:
            load_preset(path)
        assert needle in str(e.value) and str(path) in str(e.value)
    (tmp_path / "broken.toml").write_text("name = [unclosed\n")
    with pytest.raises(InputError, match="invalid TOML"):
        load_preset(tmp_path / "broken.toml")
    with pytest.raises(InputError, match="cannot read"):
        load_preset(tmp_path / "missing.toml")
    d = micro_dict()
    d["pix2pix"] = {}
    with pytest.raises(InputError, match="unknown section"):
        Preset.from_dict(d)


def test_with_train_overrides():
    p = load_preset("tiny-diffusion").with_train(steps=7, lr=None, precision="fp32")
    assert p.train.steps == 7 and p.train.lr == load_preset("tiny-diffusion").train.lr
    with pytest.raises(InputError, match="precision"):
        p.with_train(precision="fp8")
    with pytest.raises(InputError, match="keep must be one of last, best-val"):
        p.with_train(keep="best")
    with pytest.raises(InputError, match="needs val_batches > 0"):
        p.with_train(keep="best-val", val_batches=0)


def test_demo_image_models_train_with_equal_budgets():
    # diffusion and its baselines get the same optimizer steps and batch, each to its best validation
    trains = [load_preset(f"demo-{k}").train for k in ("diffusion", "regression", "pix2pix")]
    assert len({(t.steps, t.batch_size) for t in trains}) == 1
    assert all(t.keep == "best-val" and t.val_batches > 0 and t.val_every < t.steps for t in trains)
