"""Process-group set-up for a rank started by torchrun (or alone, for debugging)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible):"
                               " start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(*, device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group torchrun prepared: NCCL on GPU, gloo on CPU.

    We connect to torchrun's own store and prefix keys with the restart count: a plain
    ``init_process_group("gloo")`` after an elastic restart failed about half the time
    here (stale keys from the previous attempt), this way 16/16 (see env notes).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _pick_device(device, local_rank)
    # On GPU, CPU tensors still meet in a few small collectives (checkpoint agreement):
    # gloo carries those, NCCL everything on the device.
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
            is_master=False, timeout=timeout,
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"polytask_attempt_{attempt}", store)
    else:  # a single process started by hand
        if world_size != 1:
            raise RuntimeError("WORLD_SIZE > 1 without MASTER_ADDR/MASTER_PORT: start ranks with `polytask launch`")
        store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_rank_logging(rank: int, level: int = logging.INFO) -> None:
    """Every rank logs, each line tagged with its rank."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
