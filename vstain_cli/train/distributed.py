"""Process-group plumbing for ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK).

gloo on CPU, nccl on CUDA. A single process (no torchrun) is world size 1 and
never touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from vstain_cli.runtime import cpu_threads_per_process, place, resolve_device


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Join the process group torchrun describes (or run alone)."""
        p = place()
        world, rank, local = p.world_size, p.rank, p.local_rank
        dev = resolve_device(device, local)  # InputError for an unknown or missing device
        if world > 1 and not tdist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
            if dev.type == "cpu":
                torch.set_num_threads(cpu_threads_per_process())  # share the cores between local processes
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and tdist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (in place; identity when alone)."""
        if self.active:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``module`` (or ``module`` itself when alone)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)

    def close(self) -> None:
        if self.active:
            tdist.destroy_process_group()
