"""Seeds: every random stream derives from the user's ``--seed`` here, by name.

A stream is ``derive_seed(seed, STREAM, *counters)``: numpy's SeedSequence hashes
the integers, so streams never overlap and a result depends only on (seed,
stream, counters) — not on the order work is done in, the number of processes,
or the device. Tensors are drawn from CPU generators wherever results must be
bit-identical across devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Named streams: the first counter after the seed. Values are part of the output
# format (changing one changes every result drawn from it).
INIT, TRAIN_DROPOUT, TRAIN_NOISE = 0, 1, 2          # train: (seed, step, rank, stream) — see train_seed
VALIDATION = 10**9                                   # train: fixed noise for validation and sample grids
CALIBRATE = 0x63616C                                 # calibrate: (phase, batch, sample)
SCORE_SAMPLES = 0x756E63                             # score: uncertainty-panel samples
SCORE_TILES = 0x736374                               # score: sampled model tiles per batch
SCORE_NOISE = 0x6E6F69                               # score: the noise check's N(0, 16) added to tiles


SAMPLE_STRIDE = 1_000_003  # whole-slide sample k of an uncertainty map uses noise seed seed + SAMPLE_STRIDE k


def sample_seed(seed: int, k: int) -> int:
    """The noise-canvas seed of whole-slide sample ``k`` (sample 0 is what ``stain`` draws)."""
    return int(seed) + SAMPLE_STRIDE * int(k)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
               .generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """The seed of one training step's stream (INIT, TRAIN_DROPOUT or TRAIN_NOISE) on one rank."""
    return derive_seed(seed, step, rank, stream)


def torch_generator(seed: int, device: "str | torch.device" = "cpu") -> "torch.Generator":
    """A torch generator on ``device`` seeded with ``seed``."""
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))


def numpy_rng(seed: int, *stream: int) -> np.random.Generator:
    """A numpy generator for (seed, *stream): ``default_rng([seed, *stream])``, ``default_rng(seed)`` alone."""
    return np.random.default_rng([int(seed), *map(int, stream)] if stream else int(seed))


def seed_torch(seed: int) -> None:
    """Seed torch's global generators (weight initialisation, dropout): the only global seeding."""
    import torch

    torch.manual_seed(int(seed))
