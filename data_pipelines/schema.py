"""The one sample schema every source is turned into, and the batch the model sees.

Data flows one way: shard member -> ``decode_sample`` (dataset dict, this schema)
-> transforms -> ``collate`` -> :class:`Batch`. Models read only :class:`Batch`.

Per-sample dict (after decoding, before collate)::

    key         str                      "<source>/<sample key>", unique over all sources
    source      str                      source name (manifest ``name``)
    image       tv_tensors.Image         uint8 [3, H, W]
    task_mask   torch.bool [T]           which of the job's tasks (``model.tasks``, config order)
                                         this sample is labelled for
    boxes       tv_tensors.BoundingBoxes float32 [N, 4] XYXY absolute pixels (instances + keypoint
                                         instances; empty [0, 4] when the sample has none)
    labels      int64 [N]                class index in the label space of the detection task the
                                         source feeds (its cascade tasks share it)
    iscrowd     bool [N]                 crowd regions: kept for evaluation, ignored by losses
    masks       tv_tensors.Mask uint8 [N, H, W]       instance masks (only when instance_mask)
    keypoints   tv_tensors.KeyPoints float32 [N, K, 2]  (x, y) absolute pixels
    keypoint_visibility  int64 [N, K]    COCO visibility 0 (not labelled), 1, 2
    semantic    tv_tensors.Mask int64 [H, W]  class index per pixel, ``IGNORE_INDEX`` = unlabelled
    class_label/<task>     int64 scalar  image-level class index, per classification task (a
                                         source may feed several: weather and time of day)
    thing_coverage     bool [C_thing]    the classes the sample's source annotates (detection,
    semantic_coverage  bool [C_semantic]  instance_mask; semantic; a classification task),
    class_coverage/<task>  bool [C_task] present only when it annotates some but not all:
                                         absent = all

A source feeds at most one task of each type (``data_pipelines/tasks.py``) but classification,
where each of its image-label fields feeds a task: the keys are per type, each holding the
sample's labels in the label space of its task of that type, and per task for classification.
Keys for tasks a sample is not labelled for may be absent or hold empty tensors; the
``task_mask`` is the only authority on what is labelled. What a source does not annotate
gets no loss: a class outside its coverage is neither positive nor negative on its samples,
and a keypoint its schema lacks has visibility 0 (COCO's "not labelled").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the types alone must not cost its 5 s import (CLI)
    import torch

# The kinds of annotation, which are also the types of tasks (data_pipelines/tasks.py).
TASK_TYPES: tuple[str, ...] = ("detection", "instance_mask", "keypoints", "semantic", "classification")

# Task type -> the per-sample target holding its class coverage (keypoints need none: visibility 0;
# classification: per task, class_coverage_key).
COVERAGE_KEYS: dict[str, str] = {
    "detection": "thing_coverage",
    "instance_mask": "thing_coverage",
    "semantic": "semantic_coverage",
}
# Per-sample targets keyed per task (prefix + task name): a source may feed several
# classification tasks, each image then holding a label for each.
CLASS_LABEL_PREFIX = "class_label/"
CLASS_COVERAGE_PREFIX = "class_coverage/"
TASK_TARGET_PREFIXES: tuple[str, ...] = (CLASS_LABEL_PREFIX, CLASS_COVERAGE_PREFIX)


def class_label_key(task: str) -> str:
    return CLASS_LABEL_PREFIX + task


def class_coverage_key(task: str) -> str:
    return CLASS_COVERAGE_PREFIX + task

# Semantic masks use this value for pixels without a label (the usual VOC/ADE convention).
IGNORE_INDEX = 255


def task_mask_for(labelled: list[str] | tuple[str, ...], tasks: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Boolean mask over the job's task names ``tasks`` for a source labelling the tasks
    named in ``labelled``."""
    unknown = sorted(set(labelled) - set(tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(tasks)}")
    import torch

    return torch.tensor([name in labelled for name in tasks], dtype=torch.bool)


@dataclass
class Batch:
    """A collated batch.

    Args:
        images: float32 [B, 3, H, W] in [0, 1] (normalisation belongs to the model).
        targets: one dict per sample with the per-sample tensors of the schema above
            (``boxes``, ``labels``, ``iscrowd``, ``masks``, ``keypoints``,
            ``keypoint_visibility``, ``semantic``, ``class_label/<task>`` and the coverage keys)
            as plain tensors.
        task_mask: bool [B, T], a column per task of the job, in ``model.tasks`` order.
        keys: sample keys, for audit and debugging.
        sources: source name of each sample.
        image_sizes: int64 [B, 2], each image's (height, width) before collate padded it
            (bottom/right; image 0, instance masks 0, semantic ``IGNORE_INDEX``) to the
            batch's largest. On the CPU, also after :meth:`to`: it sizes crops on the host.
            None (the default) is filled in as every image filling the batch.
    """

    images: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    task_mask: torch.Tensor
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    image_sizes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.image_sizes is None:
            import torch

            self.image_sizes = torch.tensor([list(self.images.shape[-2:])] * self.images.shape[0], dtype=torch.int64)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            images=self.images.to(device, non_blocking=True),
            targets=[{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets],
            task_mask=self.task_mask.to(device, non_blocking=True),
            keys=self.keys,
            sources=self.sources,
            image_sizes=self.image_sizes,
        )

    def __len__(self) -> int:
        return self.images.shape[0]
