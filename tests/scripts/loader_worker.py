"""torchrun worker: this rank's training batches over a source with uneven shards, read
by 2 data-loader workers, each step closed by an all-reduce as DDP would (a rank that
ran dry would hang the others). Writes, for the test to check:

- ``full_rank<r>.json``: keys and image checksums of ``--steps`` batches;
- ``head_rank<r>.json`` + ``state_rank<r>.pt``: the first ``--stop`` batches of a second
  loader and its state after them (resumed by the test in another process).
"""
import argparse
import itertools
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.config import TransformConfig


def config(source: str, *, num_workers: int) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(path=source)], batch_size=3, num_workers=num_workers, readers_per_rank=2,
        seed=7, shuffle_buffer=4, transforms=TransformConfig(image_size=16, scale_range=(0.7, 1.3), brightness=0.2),
    )


def record(batches) -> list[dict]:
    return [{"keys": b.keys, "checksum": float(b.images.double().sum())} for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)

    loader, _, _ = build_train_loader(config(args.source, num_workers=2), rank=rank, world_size=world)
    batches = []
    for batch in itertools.islice(loader, args.steps):
        batches.append(batch)
        dist.all_reduce(torch.ones(1))  # every rank must reach every step
    (out / f"full_rank{rank}.json").write_text(json.dumps(record(batches)))

    loader, _, _ = build_train_loader(config(args.source, num_workers=2), rank=rank, world_size=world)
    head = list(itertools.islice(loader, args.stop))
    torch.save(loader.state_dict(), out / f"state_rank{rank}.pt")
    (out / f"head_rank{rank}.json").write_text(json.dumps(record(head)))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    main()
