"""Heads cascaded on boxes (instance masks, keypoints): which ground-truth instances
they train on, and the RoI pooling + loss skeleton they share."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from models.backbone import FPN_STRIDES
from models.heads.base import Features, TaskHead, zero_loss


def trainable_instances(target: dict[str, Tensor]) -> Tensor:
    """bool [N]: instances a loss may use; crowd regions are kept for evaluation only,
    and empty boxes would divide by zero when projecting masks or keypoints."""
    boxes = target["boxes"]
    return ~target["iscrowd"].bool() & (boxes[:, 2:] > boxes[:, :2]).all(dim=1)


def sample_rois(
    targets: list[dict[str, Tensor]],
    labelled: Tensor,
    *,
    eligible: Callable[[dict[str, Tensor]], Tensor],
    max_per_image: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per image, indices of at most ``max_per_image`` eligible instances and their boxes.

    More than that: a random subset, so every instance gets trained on over time.
    Unlabelled images get none, and their targets are not read (they may lack the keys).
    """
    indices, boxes = [], []
    for target, is_labelled in zip(targets, labelled.tolist()):
        if not is_labelled:
            indices.append(torch.zeros(0, dtype=torch.long, device=labelled.device))
            boxes.append(torch.zeros((0, 4), device=labelled.device))
            continue
        index = eligible(target).nonzero().flatten()
        if index.numel() > max_per_image:
            index = index[torch.randperm(index.numel(), device=index.device)[:max_per_image]]
        indices.append(index)
        boxes.append(target["boxes"][index])
    return indices, boxes


class RoICascadeHead(TaskHead):
    """RoIAlign over every FPN level -> ``self.head`` -> ``self.predictor``; in training the
    RoIs are ground-truth boxes (at most ``max_rois_per_image``), at predict detections.

    Pooling from every level keeps all FPN parameters in the graph (an empty level gives
    zero gradients), and with no RoI at all the head runs on an empty batch: every
    parameter takes part in every step, as DDP without unused-parameter search needs.
    """

    head: nn.Module
    predictor: nn.Module

    def __init__(self, *, roi_size: int, max_rois_per_image: int) -> None:
        super().__init__()
        self.roi_pool = MultiScaleRoIAlign(list(FPN_STRIDES), output_size=roi_size, sampling_ratio=2)
        self.max_rois_per_image = max_rois_per_image

    def _logits(self, features: Features, boxes: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        pooled = self.roi_pool(features, boxes, [image_size] * len(boxes))
        return self.predictor(self.head(pooled))

    @staticmethod
    @abstractmethod
    def _eligible(target: dict[str, Tensor]) -> Tensor:
        """bool [N]: the instances of one image this head can train on."""

    @abstractmethod
    def _roi_loss(self, logits: Tensor, boxes: list[Tensor], targets: list[dict[str, Tensor]],
                  chosen: list[Tensor]) -> Tensor:
        """torchvision's loss for the images that have RoIs (all lists aligned)."""

    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor, *,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[Tensor, int]:
        chosen, boxes = sample_rois(targets, labelled, eligible=self._eligible, max_per_image=self.max_rois_per_image)
        logits = self._logits(features, boxes, image_size)
        num_labelled = int(labelled.sum())
        if logits.shape[0] == 0:
            return zero_loss(logits), num_labelled
        used = [b for b, i in enumerate(chosen) if i.numel()]
        loss = self._roi_loss(logits, [boxes[b] for b in used], [targets[b] for b in used], [chosen[b] for b in used])
        return loss, num_labelled
