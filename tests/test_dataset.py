"""The dataset reader: format checks and helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vstain_cli.data.store import he_to_unit, normalize_af, open_dataset, unit_to_he
from vstain_cli.errors import InputError


def test_open_tiny_dataset(tiny_dataset):
    info = open_dataset(tiny_dataset)
    assert info.channels == 4 and info.tile_size == 32
    assert len(info.patch_keys("train")) == 24 and info.labels("val").tolist() == [1] * 6 + [2] * 6
    af, he = info.arrays("s0")
    assert af.shape == (6, 4, 32, 32) and he.dtype == np.uint8


def test_corrupt_or_missing_datasets_name_the_file(tmp_path, tiny_dataset):
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no dataset.json"):
        open_dataset(tmp_path / "empty")
    (tiny_dataset / "dataset.json").write_text("{broken")
    with pytest.raises(InputError, match="corrupt dataset.json"):
        open_dataset(tiny_dataset)
    (tiny_dataset / "dataset.json").write_text(json.dumps({"format": "vstain-dataset", "channels": 3}))
    with pytest.raises(InputError, match="missing field"):
        open_dataset(tiny_dataset)


def test_wrong_array_shapes_are_reported(tiny_dataset):
    np.save(tiny_dataset / "slides" / "s0" / "af.npy", np.zeros((6, 3, 32, 32), np.uint16))
    with pytest.raises(InputError, match="shapes"):
        open_dataset(tiny_dataset).arrays("s0")


def test_normalisation_round_trips():
    af = np.array([[[0, 100, 200]]], np.uint16).reshape(1, 1, 3)
    out = normalize_af(af, np.array([100.0]), np.array([200.0]))
    np.testing.assert_allclose(out.ravel(), [-1, -1, 1])
    rgb = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(unit_to_he(he_to_unit(rgb)), rgb)
