"""Data parallelism under torchrun, on PyTorch's own engine (torch.distributed, DDP).

A run started by ``torchrun --nproc-per-node N -m cifar_onecycle train ...`` finds RANK,
LOCAL_RANK and WORLD_SIZE in its environment and joins the process group (NCCL on CUDA, gloo on
the CPU). Without them everything here is a no-op for a single process.

This module reads the launcher's environment (``launch_rank``, ``init_distributed``) and is the
only one that does.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError, as_setting


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that prints and writes the run folder."""
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group when launched by it; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
        # A rank that dies makes torchrun stop the others; the timeout bounds a collective that
        # waits for a rank that is merely stuck.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return Dist(rank, world, local_rank)


def shutdown() -> None:
    """Leave the process group, after collecting garbage: DDP and gloo objects caught in reference
    cycles would otherwise be freed during the interpreter's finalization, after the group is gone,
    where gloo can abort the process ("terminate called without an active exception", exit -6 on
    rank 1 after the last epoch: 3 of 10 runs of tests/test_distributed.py without the collection,
    5 of them with a barrier before the teardown, which did not help; none in 5 runs with it)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def test_shard(n: int, rank: int, world: int) -> slice:
    """This rank's part of the test set: contiguous, the parts together cover it exactly once."""
    bounds = [n * r // world for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def wait_for_ranks(ranks: Dist) -> None:
    """Every rank waits here until all have come (a barrier); nothing for a single process."""
    if ranks.world > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, ranks: Dist) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself for a single process."""
    if ranks.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module, ranks: Dist) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank ran its own batches through them)."""
    if ranks.world > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def check_batch(batch_size: int, ranks: Dist) -> None:
    if batch_size % ranks.world:
        raise UserError(f"{as_setting('batch_size')} {batch_size} is the global batch and must divide by the "
                        f"{ranks.world} processes; use a multiple of {ranks.world}")
