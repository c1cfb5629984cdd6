"""Checkpoint save time: our atomic DCP save vs ``torch.save`` of the same tensors to the
same disk, in one process (world size 1, gloo). Prints the ratio of medians.

    .venv/bin/python bench/checkpoint_save.py [--repeats 5] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.schema import TASKS  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from trainer.backends.ddp import DDPBackend  # noqa: E402
from trainer.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from trainer.distributed import init_distributed, shutdown_distributed  # noqa: E402
from trainer.optim import OptimConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    os.environ.pop("RANK", None)
    init_distributed(device="cpu")
    num_classes = {t: 3 for t in TASKS} | {"keypoints": 5}
    backend = DDPBackend(build_model(ModelConfig(), num_classes=num_classes), optim=OptimConfig(),
                         max_steps=10, device=torch.device("cpu"), async_save=True)
    for p in backend.model.parameters():  # populate AdamW's moments, as in a real checkpoint
        p.grad = torch.randn_like(p)
    backend.optimizer_step()
    extra = {"train": {"step": 1}}

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        checkpointer = Checkpointer(run_dir=root / "run", cfg=CheckpointConfig(keep_last=1), is_main=True)
        ours, plain, durable, blocking = [], [], [], []
        sync_save = backend._save_group
        for i in range(args.repeats):
            backend._save_group = None  # synchronous
            t0 = time.perf_counter()
            checkpointer.save(2 * i, lambda d: backend.save(d, extra), {})
            ours.append(time.perf_counter() - t0)

            backend._save_group = sync_save  # async: what a training step waits for
            t0 = time.perf_counter()
            checkpointer.save(2 * i + 1, lambda d: backend.save(d, extra), {})
            blocking.append(time.perf_counter() - t0)
            checkpointer.poll(wait=True)

            state = backend._state(extra)  # the very tensors DCP wrote
            target = root / f"plain_{i}.pt"
            t0 = time.perf_counter()
            torch.save(state, target)
            plain.append(time.perf_counter() - t0)
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)  # our checkpoint is on disk when save returns; compare like with like too
            os.close(fd)
            durable.append(time.perf_counter() - t0)
            target.unlink()
        size = sum(f.stat().st_size for f in (root / "run" / "checkpoints").rglob("*") if f.is_file())
        shutil.rmtree(root / "run")
    shutdown_distributed()

    o, p, d, b = (statistics.median(x) for x in (ours, plain, durable, blocking))
    print(f"checkpoint size        : {size / 2**20:.1f} MiB")
    print(f"torch.save             : {p * 1000:8.1f} ms (median of {args.repeats})")
    print(f"torch.save + fsync     : {d * 1000:8.1f} ms")
    print(f"polytask DCP (atomic)  : {o * 1000:8.1f} ms")
    print(f"ratio polytask/torch.save: {o / p:.2f}  (target <= 1.5); vs torch.save+fsync: {o / d:.2f}")
    print(f"async save, time the training loop waits: {b * 1000:8.1f} ms ({b / o:.2f} of a synchronous save)")


if __name__ == "__main__":
    main()
