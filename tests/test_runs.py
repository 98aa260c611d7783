"""load_run: trained run folders opened for inference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset
from train_helpers import micro

from vstain_cli.errors import InputError, VstainError
from vstain_cli.infer.run import load_run
from vstain_cli.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ds = make_tiny_dataset(root / "ds")
    out = {}
    for name in ("tiny-diffusion-br", "tiny-regression", "tiny-stainnet"):
        out[name] = root / name
        train(micro(name, train={"steps": 2}), ds, out[name], device="cpu")
    return out


def test_diffusion_run(runs):
    run = load_run(runs["tiny-diffusion-br"])
    assert run.kind == "diffusion" and run.channels == 4 and run.tile_size == 32 and run.step == 2
    assert run.prior and run.prediction == "v" and run.schedule.T == 1000
    assert not run.model.training and not any(p.requires_grad for p in run.model.parameters())
    assert run.classifier is None
    af = torch.rand(2, 4, 24, 40) * 2 - 1
    cond = run.condition(af)
    assert cond.shape == (2, 8, 24, 40) and torch.count_nonzero(cond[:, 4:]) == 0  # fully masked prior
    a = run.translate(af, steps=3, generator=torch.Generator().manual_seed(0))
    b = run.translate(af, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 24, 40) and torch.equal(a, b) and a.abs().max() <= 1
    seen = []
    run.translate(af[:1], sampler="dpmpp-2m", steps=2, callback=lambda i, n, x: seen.append(i))
    assert seen == [0, 1]
    raw = np.full((4, 8, 8), 900, np.uint16)
    np.testing.assert_allclose(run.normalize(raw), -1.0)
    with pytest.raises(InputError, match="5 channels"):
        run.normalize(np.zeros((5, 8, 8)))


def test_regression_and_stainnet_runs(runs):
    reg = load_run(runs["tiny-regression"])
    assert reg.schedule is None and reg.prediction is None
    out = reg.translate(torch.zeros(1, 4, 32, 32))
    assert out.shape == (1, 3, 32, 32)
    sn = load_run(runs["tiny-stainnet"])
    assert sn.classifier is sn.model and sn.kind == "stainnet"
    x = torch.zeros(3, 3, 32, 32)
    assert sn.classifier(x).shape == (3, 4) and sn.classifier.features(x).shape == (3, 8)
    with pytest.raises(VstainError, match="classifies"):
        sn.translate(torch.zeros(1, 4, 32, 32))


def test_load_run_errors_name_the_file(runs, tmp_path):
    with pytest.raises(InputError, match="run folder not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(runs["tiny-regression"], bad)
    (bad / "weights.safetensors").unlink()
    with pytest.raises(InputError) as e:
        load_run(bad)
    assert "weights.safetensors" in str(e.value)
    shutil.copy(runs["tiny-stainnet"] / "weights.safetensors", bad / "weights.safetensors")
    with pytest.raises(InputError, match="stainnet model"):
        load_run(bad)
    cfg = json.loads((runs["tiny-regression"] / "config.json").read_text())
    cfg["preset"]["model"]["base_channels"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    shutil.copy(runs["tiny-regression"] / "weights.safetensors", bad / "weights.safetensors")
    with pytest.raises(InputError, match="do not fit"):
        load_run(bad)
    (bad / "config.json").write_text("[]")
    with pytest.raises(InputError, match="config.json"):
        load_run(bad)
