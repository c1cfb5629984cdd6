"""Keypoint R-CNN keypoint branch cascaded on boxes: ground-truth boxes in training, detections at predict."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import keypointrcnn_inference, keypointrcnn_loss

from models.heads.base import Features
from models.heads.instances import RoICascadeHead, trainable_instances
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
class KeypointHead(RoICascadeHead):
    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(roi_size=cfg.keypoint_roi_size, max_rois_per_image=cfg.max_rois_per_image)
        self.head = KeypointRCNNHeads(in_channels, [in_channels] * cfg.keypoint_head_convs)
        self.predictor = KeypointRCNNPredictor(in_channels, num_classes)  # heatmaps 4x the RoI size

    _eligible = staticmethod(_with_keypoints)

    def _roi_loss(self, logits: Tensor, boxes: list[Tensor], targets: list[dict[str, Tensor]],
                  chosen: list[Tensor]) -> Tensor:
        # .contiguous(): torchvision .view()s the heatmaps, which fails on channels-last ones (model.channels_last).
        return keypointrcnn_loss(logits.contiguous(), boxes, [_torchvision_keypoints(t) for t in targets], chosen)

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        if detections is None:
            raise ValueError("the keypoints head predicts on detections; pass detections=")
        boxes = [d["boxes"] for d in detections]
        # Runs on every detected box whatever its class; callers keep the classes that have keypoints.
        keypoints, scores = keypointrcnn_inference(self._logits(features, boxes, image_size), boxes)
        return [{"keypoints": k, "keypoint_scores": s} for k, s in zip(keypoints, scores)]
