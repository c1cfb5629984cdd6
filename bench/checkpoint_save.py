"""Checkpoint save time: our atomic DCP save vs ``torch.save`` of the same tensors to the
same disk. Prints the ratio of medians.

One process: DCP writes everything, as torch.save does. Under torchrun (DDP, replicated
state): DCP splits the writing over the ranks; the baseline is what a non-sharded DDP
trainer does, rank 0 ``torch.save``-ing the whole state while the others wait.

    .venv/bin/python -m bench.checkpoint_save [--repeats 5] [--dir /tmp] [--format raw|dcp]
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m bench.checkpoint_save --dir /tmp
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.schema import TASK_TYPES
from models import ModelConfig, build_model
from trainer.backends.ddp import DDPBackend
from trainer.checkpoint import Checkpointer
from trainer.config import CheckpointConfig
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.garbage_collection import StepGarbageCollection
from trainer.config import OptimConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model and optimizer live (cuda: both savers copy to host)")
    parser.add_argument("--gc", choices=["trainer", "auto"], default="trainer",
                        help="trainer: Python's automatic GC off, as in the training loop (trainer.gc_every); "
                             "auto: on, as a script without that schedule would run")
    parser.add_argument("--format", choices=["raw", "dcp"], default="raw",
                        help="checkpoint.format of the polytask saves: raw tensor bytes (default) or DCP's own files")
    args = parser.parse_args()

    dist_info = init_distributed(device=args.device)
    torch.manual_seed(0)  # identical replicas on every rank
    num_classes = {t: 3 for t in TASK_TYPES} | {"keypoints": 5}
    backend = DDPBackend(build_model(ModelConfig(), num_classes=num_classes).to(dist_info.device), optim=OptimConfig(),
                         max_steps=10, device=dist_info.device, async_save=True,
                         checkpoint_format=args.format)
    for p in backend.model.parameters():  # populate AdamW's moments, as in a real checkpoint
        p.grad = torch.randn_like(p)  # same on every rank (same seed)
    backend.optimizer_step()
    extra = {"train": {"step": 1}}

    # Every rank must write into the same directory: rank 0 picks it.
    tmp = [tempfile.mkdtemp(dir=args.dir) if dist_info.is_main else None]
    dist.broadcast_object_list(tmp)
    root = Path(tmp[0])
    collector = StepGarbageCollection(every=50 if args.gc == "trainer" else 0)
    try:
        checkpointer = Checkpointer(run_dir=root / "run", cfg=CheckpointConfig(keep_last=1), is_main=dist_info.is_main)
        ours, plain, durable, blocking = [], [], [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            checkpointer.save(2 * i, lambda d: backend.save(d, extra, background=False), {})
            ours.append(time.perf_counter() - t0)

            t0 = time.perf_counter()  # in the background: what a training step waits for
            checkpointer.save(2 * i + 1, lambda d: backend.save(d, extra, background=True), {})
            blocking.append(time.perf_counter() - t0)
            checkpointer.poll(wait=True)

            state = backend.state(extra)  # the very tensors DCP wrote
            target = root / f"plain_{i}.pt"
            dist.barrier()
            t0 = time.perf_counter()
            if dist_info.is_main:
                torch.save(state, target)
            dist.barrier()
            plain.append(time.perf_counter() - t0)
            if dist_info.is_main:
                fd = os.open(target, os.O_RDONLY)
                os.fsync(fd)  # our checkpoint is on disk when save returns; compare like with like too
                os.close(fd)
            dist.barrier()
            durable.append(time.perf_counter() - t0)
            if dist_info.is_main:
                target.unlink()
        checkpointer.finish()
        size = sum(f.stat().st_size for f in (root / "run" / "checkpoints").rglob("*") if f.is_file())
        dist.barrier()
    finally:
        collector.close()
        if dist_info.is_main:
            shutil.rmtree(root, ignore_errors=True)
    shutdown_distributed()
    if not dist_info.is_main:
        return

    o, p, d, b = (statistics.median(x) for x in (ours, plain, durable, blocking))
    print(f"world size {dist_info.world_size}, {dist_info.device.type}, gc {args.gc}; checkpoint size {size / 2**20:.1f} MiB")
    print(f"torch.save (rank 0)    : {p * 1000:8.1f} ms (median of {args.repeats})")
    print(f"torch.save + fsync     : {d * 1000:8.1f} ms")
    print(f"polytask DCP (atomic, checkpoint.format={args.format}): {o * 1000:8.1f} ms")
    print(f"ratio polytask/torch.save: {o / p:.2f}  (target <= 1.5); vs torch.save+fsync: {o / d:.2f}")
    print(f"async save, time the training loop waits: {b * 1000:8.1f} ms ({b / o:.2f} of a synchronous save)")


if __name__ == "__main__":
    main()
