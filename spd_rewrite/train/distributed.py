"""Process-group setup for runs launched by ``torchrun``, and the device choice.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` above 1 the
process joins a group (gloo on CPU, nccl on CUDA) through the ``MASTER_ADDR``/``MASTER_PORT``
rendezvous that torchrun provides. Without those variables the run is a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spd_rewrite.train.config import DeviceChoice, TrainConfigError

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(choice: DeviceChoice, local_rank: int = 0) -> torch.device:
    """Return the device for ``choice``; ``auto`` takes CUDA when available.

    Raises:
        TrainConfigError: ``cuda`` was requested but CUDA is not available.
    """
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainConfigError(
            "device 'cuda' requested but CUDA is not available; use --device cpu"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool
    """True when ``init_distributed`` created the group and ``close`` should destroy it."""

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and logs progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes in place and return it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_choice: DeviceChoice) -> DistributedContext:
    """Join the process group that ``torchrun`` describes, or return a one-process context.

    A group that the caller already initialised is used as is and left open.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size == 1:
        return DistributedContext(0, 1, 0, device, owns_process_group=False)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined %s process group as rank %d of %d", backend, rank, world_size)
    return DistributedContext(rank, world_size, local_rank, device, owns_process_group=owns)
