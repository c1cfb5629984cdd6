"""Per-task losses normalised over the *global* batch.

Heads return each task's loss averaged over the local samples that carry its labels.
Ranks (and micro-batches) hold different numbers of labelled samples, so averaging local
means would overweight samples on sparse ranks. The global number of labelled samples
per task over the whole optimizer step (all ranks, all micro-batches) comes from the
batches' task masks with one all-reduce of a [T] tensor, before any forward pass; each
micro-batch's local mean is then rescaled so that DDP's average, summed over the
micro-batches, is the mean over every labelled sample of the step, as with one big batch.
Every rank runs that all-reduce every step, whatever its batches hold. It is started
before the first forward pass and waited for after it, so it overlaps the forward instead
of adding a second synchronisation point per step (measured in bench/step_overhead.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from data_pipelines.schema import Batch


def local_task_counts(batch: Batch, tasks: list[str]) -> torch.Tensor:
    """Labelled samples per task in one local batch, float32 [T] (what the heads average
    over); ``tasks``: the job's task names, which are the task mask's columns."""
    if batch.task_mask.shape[1] != len(tasks):
        raise ValueError(f"the batch's task mask has {batch.task_mask.shape[1]} columns for {len(tasks)} tasks {tasks}")
    return batch.task_mask.sum(dim=0).float()


class GlobalTaskCounts:
    """Labelled samples per task over the step's micro-batches on every rank: an
    all-reduce started at construction (collective) and finished by :meth:`wait`."""

    def __init__(self, batches: list[Batch], tasks: list[str], *, world_size: int) -> None:
        self._counts = torch.stack([local_task_counts(b, tasks) for b in batches]).sum(dim=0)
        self._work = dist.all_reduce(self._counts, async_op=True) if world_size > 1 else None

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._counts


def scale_task_losses(losses: dict[str, torch.Tensor], local_counts: torch.Tensor,
                      global_counts: torch.Tensor, *, world_size: int) -> dict[str, torch.Tensor]:
    """Rescale local means so that DDP's gradient average equals the global per-sample mean.

    A task without any labelled sample in the step gets factor 0 (its loss is an exact
    zero that still touches its head's parameters, keeping collectives identical).
    """
    factors = local_counts * world_size / global_counts.clamp(min=1.0)
    return {t: loss * factors[i] for i, (t, loss) in enumerate(losses.items())}
