"""Keypoint R-CNN keypoint branch cascaded on boxes: ground-truth boxes in training, detections at predict."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import keypointrcnn_inference, keypointrcnn_loss
from torchvision.ops import MultiScaleRoIAlign

from models.backbone import FPN_STRIDES
from models.heads.base import Features, TaskHead, zero_loss
from models.heads.instances import sample_rois, trainable_instances
from models.heads.registry import register_head

if TYPE_CHECKING:
    from models.config import ModelConfig


def _torchvision_keypoints(target: dict[str, Tensor]) -> Tensor:
    """[N, K, 3] (x, y, visibility), the layout torchvision's keypoint loss reads."""
    return torch.cat([target["keypoints"], target["keypoint_visibility"][..., None].to(target["keypoints"])], dim=-1)


def _with_keypoints(target: dict[str, Tensor]) -> Tensor:
    # Boxes also hold instances of classes without keypoints; only labelled keypoints give a target.
    return trainable_instances(target) & (target["keypoint_visibility"] > 0).any(dim=1)


@register_head("keypoints")
class KeypointHead(TaskHead):
    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # Pooling from every level keeps all FPN parameters in the graph, as in the mask head.
        self.roi_pool = MultiScaleRoIAlign(list(FPN_STRIDES), output_size=cfg.keypoint_roi_size, sampling_ratio=2)
        self.keypoint_head = KeypointRCNNHeads(in_channels, [in_channels] * cfg.keypoint_head_convs)
        self.predictor = KeypointRCNNPredictor(in_channels, num_classes)  # heatmaps 4x the RoI size
        self.max_rois_per_image = cfg.max_rois_per_image

    def _logits(self, features: Features, boxes: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        pooled = self.roi_pool(features, boxes, [image_size] * len(boxes))
        return self.predictor(self.keypoint_head(pooled))

    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor
    ) -> tuple[Tensor, int]:
        chosen, boxes = sample_rois(
            targets, labelled, eligible=_with_keypoints, max_per_image=self.max_rois_per_image
        )
        # With no RoI at all the heads run on an empty batch, which keeps every parameter
        # in the graph with zero gradients.
        logits = self._logits(features, boxes, image_size)
        num_labelled = int(labelled.sum())
        if logits.shape[0] == 0:
            return zero_loss(logits), num_labelled
        used = [b for b, i in enumerate(chosen) if i.numel()]
        loss = keypointrcnn_loss(
            logits,
            [boxes[b] for b in used],
            [_torchvision_keypoints(targets[b]) for b in used],
            [chosen[b] for b in used],
        )
        return loss, num_labelled

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]]:
        if detections is None:
            raise ValueError("the keypoints head predicts on detections; pass detections=")
        boxes = [d["boxes"] for d in detections]
        # Runs on every detected box whatever its class; callers keep the classes that have keypoints.
        keypoints, scores = keypointrcnn_inference(self._logits(features, boxes, image_size), boxes)
        return [{"keypoints": k, "keypoint_scores": s} for k, s in zip(keypoints, scores)]
