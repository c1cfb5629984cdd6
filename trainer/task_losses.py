"""Per-task losses normalised over the *global* batch.

Heads return each task's loss averaged over the local samples that carry its labels,
and how many there were. Ranks hold different numbers of labelled samples, so a plain
DDP gradient average of local means would overweight samples on sparse ranks. One
all-reduce of a [T, 2] tensor (counts, count-weighted loss sums) gives the global
counts; each local loss is then rescaled so that DDP's average equals the mean over
all labelled samples in the global batch, as with one big batch. Every rank runs this
all-reduce every step, whatever its batch holds (collectives stay identical).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ReducedLosses:
    scaled: dict[str, torch.Tensor]  # differentiable; DDP's average of these = global mean
    global_mean: torch.Tensor  # [T] detached, mean loss over all labelled samples (0 if none)
    global_count: torch.Tensor  # [T] labelled samples per task over all ranks
    tasks: list[str]


def reduce_task_losses(losses: dict[str, torch.Tensor], counts: dict[str, int], *,
                       world_size: int) -> ReducedLosses:
    tasks = list(losses)
    device = next(iter(losses.values())).device
    local_counts = torch.tensor([float(counts[t]) for t in tasks], device=device)
    local_sums = torch.stack([losses[t].detach().float() for t in tasks]) * local_counts
    stats = torch.stack([local_counts, local_sums], dim=1)
    if world_size > 1:
        dist.all_reduce(stats)
    global_count, global_sum = stats[:, 0], stats[:, 1]
    denom = global_count.clamp(min=1.0)
    factors = local_counts * world_size / denom
    scaled = {t: losses[t] * factors[i] for i, t in enumerate(tasks)}
    return ReducedLosses(scaled=scaled, global_mean=global_sum / denom, global_count=global_count, tasks=tasks)
