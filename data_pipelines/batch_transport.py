"""How a :class:`Batch` travels from a data-loader worker to the trainer's process.

Every tensor sent from a worker becomes a shared-memory segment of its own, at a fixed
cost per tensor that dwarfs copying a few boxes. A batch's per-sample targets (a dozen
small tensors per sample) are therefore packed per key into one tensor, in shared
memory, before the hand-over, and split back into views after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipelines.collate import TARGET_KEYS
from data_pipelines.schema import Batch
from data_pipelines.shared_memory import empty_for_transport

# Targets with one value per sample, stacked; the others have one row per instance, concatenated.
_PER_SAMPLE = ("semantic", "class_label")


@dataclass
class PackedBatch:
    images: torch.Tensor
    task_mask: torch.Tensor
    keys: list[str]
    sources: list[str]
    # target key -> (indices of the samples that have it, their row counts, the packed tensor)
    targets: dict[str, tuple[list[int], list[int], torch.Tensor]]


def pack(batch: Batch) -> PackedBatch:
    targets = {}
    for key in TARGET_KEYS:
        have = [i for i, t in enumerate(batch.targets) if key in t]
        if not have:
            continue
        values = [batch.targets[i][key] for i in have]
        if key in _PER_SAMPLE:
            out = empty_for_transport((len(values), *values[0].shape), values[0].dtype)
            targets[key] = (have, [], torch.stack(values, out=out))
        else:
            out = empty_for_transport((sum(len(v) for v in values), *values[0].shape[1:]), values[0].dtype)
            targets[key] = (have, [len(v) for v in values], torch.cat(values, out=out))
    return PackedBatch(batch.images, batch.task_mask, batch.keys, batch.sources, targets)


def unpack(packed: PackedBatch) -> Batch:
    targets: list[dict[str, torch.Tensor]] = [{} for _ in packed.keys]
    for key, (have, counts, values) in packed.targets.items():
        parts = values.unbind(0) if key in _PER_SAMPLE else values.split(counts)
        for i, part in zip(have, parts):
            targets[i][key] = part
    return Batch(images=packed.images, targets=targets, task_mask=packed.task_mask, keys=packed.keys,
                 sources=packed.sources)
