"""Data-parallel training under ``torchrun``: process group, rank, shards and replica checks.

``torchrun --nproc_per_node N`` starts N copies of a command and sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` for each. :func:`init_distributed` turns those into a process group (gloo on
CPU, NCCL on CUDA, one GPU per process); without them, or with ``WORLD_SIZE=1``, nothing is set
up and every helper here answers for a single process (rank 0 of 1), so callers need no branches
of their own. The trainer's data sharding follows ``DistributedSampler``: every rank draws the
same permutation and keeps its own slice of it (:func:`shard`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "barrier",
    "broadcast_from_main",
    "check_replicas_in_sync",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "main_first",
    "same_on_all_ranks",
    "seeded_generator",
    "shard",
    "sum_across_ranks",
    "unwrap",
]

log = logging.getLogger(__name__)
#: Rank 0 may work alone for minutes (building the dataset or aligned-views cache on a CPU)
#: while the others wait in a barrier; NCCL's default 10-minute watchdog would kill them.
COLLECTIVE_TIMEOUT = timedelta(hours=1)

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group is up (i.e. :func:`init_distributed` set one up)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that evaluates, saves and logs."""
    return get_rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes; return the device this rank trains on.

    Does nothing (and returns ``device``) unless ``WORLD_SIZE`` > 1. A CUDA ``device`` becomes
    ``cuda:LOCAL_RANK`` with the NCCL backend; anything else trains on CPU with gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index is not None and device.index != local.index:
            log.warning("--device %s ignored under torchrun: rank uses %s (LOCAL_RANK)", device, local)
        device = local
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    log.debug("rank %d of %d joined (%s, %s)", get_rank(), get_world_size(),
              dist.get_backend(), device)
    return device


def cleanup_distributed() -> None:
    """Destroy the process group, if one is up."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it, e.g. to fill a cache once.

    If rank 0 fails inside the block the others wait at the barrier until ``torchrun`` stops
    them (it ends every worker when one fails).
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def same_on_all_ranks(obj: Any) -> bool:
    """Whether every rank holds an equal ``obj`` (picklable); True in a single process."""
    if not is_distributed():
        return True
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself in a single process.

    Decisions taken from rank 0's evaluation (best epoch, early stop, plateau lr) go through
    this, so no rank's control flow can drift from the others'.
    """
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (``values`` unchanged in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of the 1-D index tensor ``order``, as ``DistributedSampler`` does it.

    ``order`` is padded by repeating it from the start to a multiple of ``world_size``, then
    rank ``r`` takes positions ``r, r + world_size, ...``. Every rank gets ``ceil(n / world_size)``
    indices, so all ranks run the same number of steps (a rank with fewer would leave the others
    waiting in an all-reduce); together they cover ``order``, disjointly when ``world_size``
    divides ``n``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    n = order.numel()
    if world_size == 1 or n == 0:
        return order
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    padded = order.repeat(-(-total // n))[:total] if total > n else order
    return padded[rank:total:world_size]


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``keys`` (mixed by numpy's ``SeedSequence``).

    ``seeded_generator(seed, epoch)`` is the same on every rank (the shared permutation);
    ``seeded_generator(seed, epoch, rank + 1)`` differs per rank (augmentation).
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def check_replicas_in_sync(model: nn.Module, *, rtol: float = 1e-6) -> None:
    """Compare ``model``'s parameters across ranks by checksums; raise if any rank diverged.

    Each parameter contributes its float64 sum and sum of squares; one all-reduce takes their
    maximum and one their minimum over ranks, and the two must agree. DDP keeps replicas
    identical (same initial weights, all-reduced gradients), so a difference is a bug: it raises
    ``RuntimeError`` naming the tensors, on every rank alike. BatchNorm running statistics are
    buffers, left out: each rank updates them on its own batch and rank 0's are the ones saved.
    A no-op in a single process.
    """
    if not is_distributed():
        return
    named = [(name, p) for name, p in unwrap(model).named_parameters()]
    device = _collective_device()
    sums = torch.stack([torch.stack((p.double().sum(), p.double().square().sum())).to(device)
                        for _, p in named])
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    bad = (~torch.isclose(hi, lo, rtol=rtol, atol=1e-12)).any(1).cpu()
    if bad.any():
        names = [name for (name, _), b in zip(named, bad.tolist(), strict=True) if b]
        raise RuntimeError(f"ranks diverged: {len(names)} of {len(named)} parameter tensors "
                           f"differ across {get_world_size()} ranks (first: {names[:3]})")
    log.info("replicas in sync: %d parameter tensors identical on all %d ranks", len(named),
             get_world_size())
