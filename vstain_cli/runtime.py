"""Where code runs: the one device resolver and the one reader of torchrun's rank variables.

Every command resolves ``--device`` here, with the same rules: ``auto`` (CUDA when
available, else Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``. A name
that cannot be used is an ``InputError`` whose one line names the flag
(``--device: ...``), so no caller wraps it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vstain_cli.errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Place:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def place() -> Place:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun sets them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Place(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def _mps_available(torch_mod) -> bool:
    mps = getattr(torch_mod.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto", local_rank: int | None = None) -> "torch.device":
    """A torch.device for ``name``; ``cuda`` without an index takes this process's local rank.

    InputError ``--device: ...`` for an unknown name or a device this machine lacks.
    """
    import torch

    name = (name or "auto").strip().lower()
    rank = place().local_rank if local_rank is None else local_rank
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return torch.device("mps") if _mps_available(torch) else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available(torch):
            raise InputError("--device: device mps was asked for but Apple's MPS backend is not available; use cpu")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise InputError(f"--device: unknown device {name!r} (choose {DEVICE_CHOICES})")
    if not torch.cuda.is_available():
        raise InputError(f"--device: device {name} was asked for but no CUDA GPU is available; use cpu")
    index = int(m.group(1)) if m.group(1) is not None else rank
    if index >= torch.cuda.device_count():
        raise InputError(f"--device: device {name} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def cpu_threads_per_process() -> int:
    """Cores shared evenly between the local torchrun processes (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, place().local_world_size))
