"""Patch dataset, paired augmentation and the deterministic step sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vstain_cli.data.loader import PatchDataset, StepBatchSampler, dihedral, spread_indices
from vstain_cli.data.store import he_to_unit, normalize_af, open_dataset


def test_dihedral_group_and_inverse():
    a = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    outs = {dihedral(a, c).tobytes() for c in range(8)}
    assert len(outs) == 8  # all eight symmetries differ on a generic image
    for c in range(8):
        np.testing.assert_array_equal(dihedral(dihedral(a, c), c, inverse=True), a)
        t = torch.from_numpy(a)
        np.testing.assert_array_equal(dihedral(t, c).numpy(), dihedral(a, c))
        assert torch.equal(dihedral(dihedral(t, c), c, inverse=True), t)


def test_patch_dataset_values_and_paired_augmentation(tiny_dataset):
    info = open_dataset(tiny_dataset)
    ds = PatchDataset(info, "train")
    assert len(ds) == 24
    af, he = info.arrays("s1")
    item = ds[(6, 0)]  # slide s1, row 0
    np.testing.assert_allclose(item["af"].numpy(), normalize_af(af[0], info.af_low, info.af_high))
    np.testing.assert_allclose(item["he"].numpy(), he_to_unit(he[0]))
    assert int(item["label"]) == 1 and item["af"].dtype == torch.float32
    for code in range(8):
        aug = ds[(6, code)]
        np.testing.assert_array_equal(aug["af"].numpy(), dihedral(item["af"].numpy(), code))
        np.testing.assert_array_equal(aug["he"].numpy(), dihedral(item["he"].numpy(), code))
    he_only = PatchDataset(info, "val", fields=("he", "label"))
    assert set(he_only[0]) == {"he", "label"}
    b = ds.batch([(0, 0), (1, 3)])
    assert b["af"].shape == (2, 4, 32, 32) and b["he"].shape == (2, 3, 32, 32)


def test_step_sampler_is_a_function_of_seed_and_step():
    full = StepBatchSampler(10, 4, 0, 8, seed=3)
    batches = list(full)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    resumed = list(StepBatchSampler(10, 4, 5, 8, seed=3))
    assert resumed == batches[5:]
    # Epochs are permutations: the first 10 samples cover every index once.
    first = [i for b in batches for i, _ in b][:10]
    assert sorted(first) == list(range(10))
    assert list(StepBatchSampler(10, 4, 0, 8, seed=4)) != batches
    # Ranks split each global batch into disjoint slices.
    r0 = list(StepBatchSampler(10, 4, 0, 8, seed=3, rank=0, world_size=2))
    r1 = list(StepBatchSampler(10, 4, 0, 8, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == batches
    with pytest.raises(ValueError):
        StepBatchSampler(10, 3, 0, 1, world_size=2)
    no_aug = list(StepBatchSampler(10, 4, 0, 2, seed=3, augment=False))
    assert all(code == 0 for b in no_aug for _, code in b)


def test_spread_indices():
    assert spread_indices(10, 3).tolist() in ([0, 4, 9], [0, 5, 9])
    assert spread_indices(3, 10).tolist() == [0, 1, 2]
    assert spread_indices(0, 4).tolist() == []
