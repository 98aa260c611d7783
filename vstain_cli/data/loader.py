"""Torch access to the patch dataset: memmapped reads, paired dihedral augmentation,
and a deterministic (seed, step) -> batch sampler that also splits work across ranks.

The order of training samples is a pure function of (seed, global position), so a
resumed run sees exactly the batches an uninterrupted one would, with any number
of DataLoader workers, and DDP ranks take disjoint slices of each global batch.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from vstain_cli import seeding
from vstain_cli.data.store import DatasetInfo, he_to_unit, normalize_af

N_AUG = 8  # the dihedral group of the square: 4 rotations x optional flip


def dihedral(x: Any, code: int, inverse: bool = False) -> Any:
    """Apply dihedral transform ``code`` (0..7) to the last two axes (numpy or torch).

    code % 4 quarter turns, then a left-right flip when code >= 4; ``inverse``
    undoes it.
    """
    k, flip = code % 4, code >= 4
    is_torch = isinstance(x, torch.Tensor)
    rot = (lambda a, n: torch.rot90(a, n, dims=(-2, -1))) if is_torch else (lambda a, n: np.rot90(a, n, axes=(-2, -1)))
    fl = (lambda a: torch.flip(a, dims=(-1,))) if is_torch else (lambda a: a[..., ::-1])
    if inverse:
        return rot(fl(x) if flip else x, -k)
    y = rot(x, k)
    return fl(y) if flip else y


class PatchDataset(Dataset):
    """Patches of one split as float tensors in [-1, 1]; items are (index, aug_code).

    Returns dicts with ``af`` (C, S, S) normalised by the dataset's train-split
    percentiles, ``he`` (3, S, S) and ``label`` (slide label), restricted to
    ``fields``. AF and H&E get the same augmentation.
    """

    def __init__(self, info: DatasetInfo, split: str, fields: Sequence[str] = ("af", "he", "label")):
        self.info = info
        self.split = split
        self.keys = info.patch_keys(split)
        self.label_of = {s: e.label for s, e in info.slides.items()}
        self.fields = tuple(fields)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memmaps are reopened in each worker
        return state

    def _slide(self, sid: str) -> tuple[np.ndarray, np.ndarray]:
        if sid not in self._arrays:
            self._arrays[sid] = self.info.arrays(sid)
        return self._arrays[sid]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        idx, aug = (item, 0) if isinstance(item, (int, np.integer)) else item
        sid, row = self.keys[int(idx)]
        af, he = self._slide(sid)
        out: dict[str, Any] = {}
        if "af" in self.fields:
            a = normalize_af(np.asarray(af[row]), self.info.af_low, self.info.af_high)
            out["af"] = torch.from_numpy(np.ascontiguousarray(dihedral(a, int(aug))))
        if "he" in self.fields:
            h = he_to_unit(np.asarray(he[row]))
            out["he"] = torch.from_numpy(np.ascontiguousarray(dihedral(h, int(aug))))
        if "label" in self.fields:
            out["label"] = torch.tensor(self.label_of[sid], dtype=torch.long)
        return out

    def batch(self, items: Sequence[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Read and collate several items in this process."""
        return default_collate([self[i] for i in items])


class StepBatchSampler(Sampler):
    """Batches for steps [start, end): this rank's slice of each global batch.

    Global sample position p = step * batch_size + i lives in epoch p // n at
    place p % n of a permutation drawn from (seed, epoch); its augmentation code
    is drawn from (seed, epoch) too. ``batch_size`` is the global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        start: int,
        end: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
    ):
        if n <= 0:
            raise ValueError("no samples")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes")
        self.n, self.batch_size, self.start, self.end = n, batch_size, start, end
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        self.local = batch_size // world_size
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            rng = seeding.numpy_rng(self.seed, e)
            perm = rng.permutation(self.n)
            aug = rng.integers(0, N_AUG, self.n) if self.augment else np.zeros(self.n, np.int64)
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (perm, aug)
        return self._epochs[e]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """(index, aug_code) of this rank's samples at ``step``."""
        first = step * self.batch_size + self.rank * self.local
        out = []
        for p in range(first, first + self.local):
            perm, aug = self._epoch(p // self.n)
            out.append((int(perm[p % self.n]), int(aug[p % self.n])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def spread_indices(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` distinct indices evenly spread over ``range(total)``, ends included
    (one index: the middle). A fixed subset for validation, sample grids and calibration."""
    k = min(n, total)
    if k <= 0:
        return np.zeros(0, np.int64)
    if k == 1:
        return np.array([total // 2], np.int64)
    return np.round(np.linspace(0, total - 1, k)).astype(np.int64)
