"""H&E stain augmentation (HED jitter): identity, physics, determinism, and its use in StainNet training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vstain_cli.data.augment import RGB_FROM_HED, hed_jitter

torch.set_num_threads(1)


def _stain_image(h: float, e: float) -> torch.Tensor:
    """A (1, 3, 8, 8) image of pure H and E densities (log10 OD) in [-1, 1]."""
    od = h * RGB_FROM_HED[0] + e * RGB_FROM_HED[1]
    rgb = 10.0 ** -od
    return torch.tensor(rgb * 2 - 1, dtype=torch.float32)[None, :, None, None].expand(1, 3, 8, 8).clone()


def test_zero_jitter_is_identity_and_tiny_jitter_nearly():
    x = torch.rand(2, 3, 16, 16) * 1.8 - 0.9
    assert hed_jitter(x, 0.0, 0.0) is x
    g = torch.Generator().manual_seed(0)
    y = hed_jitter(x, 1e-6, 0.0, g)
    assert float((y - x).abs().max()) < 1e-3  # deconvolution and remixing round-trip


def test_scale_moves_density_along_the_stain_vector():
    x = _stain_image(0.5, 0.0)  # hematoxylin only
    g = torch.Generator().manual_seed(3)
    y = hed_jitter(x, 0.5, 0.0, g)
    od_x = -torch.log10((x[0, :, 0, 0] + 1) / 2).numpy()
    od_y = -torch.log10((y[0, :, 0, 0] + 1) / 2).numpy()
    ratio = od_y / od_x
    # same hue (OD parallel to the H vector), density scaled by a in [0.5, 1.5], not 1
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)
    assert 0.5 <= ratio.mean() <= 1.5 and abs(ratio.mean() - 1) > 1e-3


def test_deterministic_per_generator_and_per_image():
    x = _stain_image(0.4, 0.3).expand(4, 3, 8, 8).clone()
    a = hed_jitter(x, 0.3, 0.05, torch.Generator().manual_seed(1))
    b = hed_jitter(x, 0.3, 0.05, torch.Generator().manual_seed(1))
    c = hed_jitter(x, 0.3, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    means = a.mean(dim=(2, 3))
    assert float(means.std(dim=0).min()) > 1e-3  # each image has its own draw
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_bad_arguments():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError):
        hed_jitter(x, 1.5, 0.0)
    with pytest.raises(ValueError):
        hed_jitter(x, 0.1, -0.1)
    with pytest.raises(ValueError):
        hed_jitter(torch.zeros(1, 4, 4, 4), 0.1, 0.0)


def test_stainnet_preset_validates_augmentation(tmp_path):
    from vstain_cli.errors import InputError
    from vstain_cli.train.presets import load_preset

    p = load_preset("tiny-stainnet")
    assert p.stainnet.hed_scale > 0 and p.stainnet.hed_shift > 0
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "stainnet"\n[stainnet]\nhed_scale = 1.5\n[train]\n')
    with pytest.raises(InputError, match="hed_scale"):
        load_preset(bad)


def test_stainnet_objective_augments_training_only():
    """The train step sees jittered patches (loss differs from the plain one); validation does not."""
    from vstain_cli.train.objectives import StainNetObjective
    from vstain_cli.train.precision import Amp
    from vstain_cli.train.presets import load_preset

    p = load_preset("tiny-stainnet")
    torch.manual_seed(0)
    obj = StainNetObjective(p, 4, torch.device("cpu"), Amp("fp32", torch.device("cpu")))
    obj.train(False)
    batch = {"he": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    plain, _ = obj._logits(obj.nets["net"], batch)
    again, _ = obj._logits(obj.nets["net"], batch)
    jit, _ = obj._logits(obj.nets["net"], batch, torch.Generator().manual_seed(0))
    assert torch.equal(plain, again) and not torch.allclose(plain, jit)
