"""The interface every task head implements, and the loss bookkeeping they share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict

import torch
from torch import Tensor, nn

Features = OrderedDict[str, Tensor]


class TaskHead(nn.Module, ABC):
    """One task's head on the shared FPN features.

    Subclasses are built as ``cls(cfg=ModelConfig, in_channels=int, num_classes=int)``
    (``num_classes`` is the number of keypoints for the keypoint head).
    ``image_size`` is the (padded) size of the images the features were computed from.
    ``task_name`` (set by ``build_head``) names the task, whose per-task targets (a
    classification task's ``class_label/<task>``) the head reads.
    """

    task_name: str

    @abstractmethod
    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor, *,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[Tensor, int]:
        """Loss over the samples where ``labelled`` (bool [B]) is True, and their count.

        Must be an exact 0.0 connected to every parameter of the head when nothing is
        labelled: DDP without ``find_unused_parameters`` needs the same graph on every rank.
        ``image_sizes``: as for :meth:`predict` (the whole batch's rows).
        """

    @abstractmethod
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """One dict of outputs per image; cascade heads read ``detections`` (boxes, labels).
        ``image_sizes``: each image's (height, width) when the batch pads smaller images
        (bottom/right) to ``image_size``; None: every image fills it."""


def zero_loss(*outputs: Tensor) -> Tensor:
    """An exact 0.0 whose gradient reaches, as zeros, every parameter behind ``outputs``."""
    return sum(o.sum() for o in outputs) * 0.0


def coverage_rows(targets: list[dict[str, Tensor]], index: Tensor, key: str, num_classes: int) -> Tensor | None:
    """bool [len(index), C]: the classes each chosen sample's source annotates (target
    ``key``, absent = all of them); None when every chosen sample covers every class, the
    common case, which then costs no masking at all."""
    rows = [targets[i].get(key) for i in index.tolist()]
    if all(r is None for r in rows):
        return None
    every = torch.ones(num_classes, dtype=torch.bool, device=index.device)
    return torch.stack([every if r is None else r.to(index.device) for r in rows])


def labelled_subset(features: Features, labelled: Tensor) -> tuple[Features, Tensor]:
    """Features of the labelled samples and their batch indices.

    With nothing labelled, sample 0 stands in (index empty) so a head can still run and
    return :func:`zero_loss` of its outputs.
    """
    index = labelled.nonzero().flatten()
    rows = index if index.numel() else torch.zeros(1, dtype=torch.long, device=labelled.device)
    return OrderedDict((k, v[rows]) for k, v in features.items()), index
