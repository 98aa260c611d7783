"""FID InceptionV3 (vstain_cli.nets.inception) against pytorch-fid's architecture."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from vstain_cli.errors import InputError
from vstain_cli.nets.inception import FEATURE_DIM, N_PARAMS, FIDInceptionV3, load_fid_inception

# torchvision documents 27,161,264 parameters for Inception3 (aux head, 1000 classes).
# pytorch-fid's fid_inception_v3 drops the aux head and has 1008 classes:
TORCHVISION_INCEPTION3 = 27_161_264
AUX_HEAD = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
EXTRA_CLASSES = 8 * 2048 + 8

# (key, shape) from the state dict of pt_inception-2015-12-05-6726825d.pth / pytorch-fid
REFERENCE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
N_BASIC_CONV = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9  # stem, 5b-d, 6a, 6b-e, 7a, 7b-c


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    m = FIDInceptionV3()
    # non-trivial BatchNorm statistics, so that a round trip is a real test
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def test_parameter_count_matches_reference(model):
    n = sum(p.numel() for p in model.parameters())
    assert n == TORCHVISION_INCEPTION3 - AUX_HEAD + EXTRA_CLASSES == N_PARAMS == 23_850_960


def test_state_dict_keys_and_shapes(model):
    sd = model.state_dict()
    for k, shape in REFERENCE_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    # every BasicConv2d: conv.weight + bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    assert len(sd) == 6 * N_BASIC_CONV + 2
    assert not any("AuxLogits" in k for k in sd)
    assert {k.split(".")[0] for k in sd} == {
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
        "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc",
    }


def test_pool3_features_and_preprocessing(model):
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    f = model.features_uint8(x)
    assert f.shape == (2, FEATURE_DIM) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # average of ReLU outputs
    # pytorch-fid: uint8/255 -> bilinear 299x299 (align_corners=False) -> 2x - 1
    xf = x.float() / 255
    want = 2 * F.interpolate(xf, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(FIDInceptionV3.preprocess(xf), want)
    p = FIDInceptionV3.preprocess(torch.full((1, 3, 10, 10), 0.75))
    assert p.shape == (1, 3, 299, 299) and torch.allclose(p, torch.tensor(0.5))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sb[k]), k


def test_weights_round_trip_pth_and_safetensors(model, tmp_path):
    from safetensors.torch import save_file

    x = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    pth = tmp_path / "fid.pth"
    torch.save(model.state_dict(), pth)
    loaded = load_fid_inception(pth)
    torch.testing.assert_close(loaded.features_uint8(x), model.features_uint8(x))
    # the 2019 weights file predates torch's zip format: the legacy format loads too
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    _assert_same_weights(model, load_fid_inception(legacy))
    # without num_batches_tracked (older files) and as safetensors
    st = tmp_path / "fid.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "num_batches" not in k}, str(st))
    _assert_same_weights(model, load_fid_inception(st))
    assert not load_fid_inception(st).training


def test_wrong_shape_names_first_bad_key(model, tmp_path):
    sd = model.state_dict()
    sd["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(InputError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*\(128, 128, 7, 1\)") as e:
        load_fid_inception(bad)
    assert "bad.pth" in str(e.value)


def test_missing_and_non_weight_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_fid_inception(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a weights file"):
        load_fid_inception(junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="missing key"):
        load_fid_inception(other)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_never_unpickles_code(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(InputError, match="not a weights file"):
        load_fid_inception(p)
    assert "unpickled code ran" not in capsys.readouterr().out
