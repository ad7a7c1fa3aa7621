"""Data-parallel meta-training on PyTorch's own DistributedDataParallel.

``torchrun --nproc-per-node N kvtool edit train-editor ...`` (or ``accelerate launch``,
which sets the same variables) starts N processes; each reads its place from the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``),
draws its own edits, and DDP averages the editor's gradients, so N processes take the
optimizer step of one process accumulating N meta-steps (``--accumulate N``). gloo on
the CPU, NCCL on CUDA (one device per process, ``cuda:LOCAL_RANK``). Every process
validates (the same weights give the same score, so they stop together); only rank 0
writes checkpoints and the artifact.

DDP broadcasts rank 0's buffers before each forward, so the editor's running input
statistics are rank 0's: every rank standardises the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from kedit_vfl.errors import UserError


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel run (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """One CUDA device per process; the CPU is shared."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, editor: nn.Module, device: torch.device) -> nn.Module:
        """The editor as DDP sees it (itself in a single process)."""
        if not self.active:
            return editor
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(editor, device_ids=ids)

    def finish(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"${name}={raw[:20]}: expected an integer (set by torchrun)") from None


def from_environment(device: torch.device) -> Distributed:
    """Join the process group that torchrun describes; a single process when it describes none."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Distributed()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise UserError(f"$RANK={rank}: outside 0..{world_size - 1}")
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise UserError("$WORLD_SIZE > 1 without $MASTER_ADDR/$MASTER_PORT: start with torchrun")
    dist = Distributed(rank, world_size, local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"$LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA devices here")
        torch.cuda.set_device(dist.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist
