"""``data.num_workers: auto``: how many data-loader workers a rank starts.

The node's cores (those this process may run on) are shared by its local ranks; each
rank's main process keeps one core for itself (it runs the step and unpacks batches).
The count must divide ``data.readers_per_rank`` (each reader's batches go to one
worker), so auto takes the largest divisor that fits.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

AUTO = "auto"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: what Slurm or taskset granted)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS: no affinity masks


def local_world_size() -> int:
    """Ranks on this node, as torchrun sets them (1 for a process started alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def auto_num_workers(*, cores: int, local_ranks: int, readers_per_rank: int) -> int:
    """The largest divisor of ``readers_per_rank`` within this rank's share of ``cores``
    minus one core for its main process; 0 (load in the main process) when no core is spare."""
    if cores < 1 or local_ranks < 1 or readers_per_rank < 1:
        raise ValueError(f"cores ({cores}), local ranks ({local_ranks}) and readers_per_rank "
                         f"({readers_per_rank}) must be >= 1")
    spare = cores // local_ranks - 1
    return max((n for n in range(1, readers_per_rank + 1) if readers_per_rank % n == 0 and n <= spare), default=0)


def resolve_num_workers(num_workers: int | str, *, readers_per_rank: int, rank: int) -> int:
    """``data.num_workers`` as a count: itself, or for ``auto`` this node's share, logged
    (with the inputs) on every rank, since nodes may differ."""
    if num_workers != AUTO:
        return int(num_workers)
    cores, local_ranks = available_cores(), local_world_size()
    resolved = auto_num_workers(cores=cores, local_ranks=local_ranks, readers_per_rank=readers_per_rank)
    log.info("rank %d: data.num_workers=auto -> %d data-loader worker(s) (%d cores / %d local rank(s) - 1 for the "
             "main process, a divisor of data.readers_per_rank=%d)", rank, resolved, cores, local_ranks,
             readers_per_rank)
    return resolved
