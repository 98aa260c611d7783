"""Preset registry: loading by name or path, validation, parameter counts."""

from __future__ import annotations

import pytest
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
    assert b.model.channel_mults == [1, 1, 2, 2, 4, 4] and b.model.num_res_blocks == 2
    assert b.model.attention_levels == [3] and b.model.attention_heads == 1 and not b.model.mid_attention
    assert lg.model.attention_levels == [3, 4, 5] and lg.model.attention_heads == 2
    assert br.diffusion.prior and not b.diffusion.prior
    assert b.diffusion.timesteps == 1000 and b.train.batch_size == 16 and b.train.lr == 1e-5
    assert cond_channels(br, 26) == 30 and cond_channels(b, 26) == 26


def test_parameter_counts():
    n_l = count_parameters(build_network(load_preset("diffusion-l"), 26))
    n_b = count_parameters(build_network(load_preset("diffusion-b"), 26))
    n_r = count_parameters(build_network(load_preset("regression"), 26))
    assert 29e6 < n_l < 32e6 and n_r < n_b < n_l
    dc, du = build_discriminators(load_preset("pix2pix"), 26)
    assert count_parameters(dc) > count_parameters(du) > 1e6
    assert count_parameters(build_network(load_preset("tiny-diffusion"), 4)) < 1e6


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
