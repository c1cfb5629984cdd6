"""Mask R-CNN mask branch cascaded on boxes: ground-truth boxes in training, detections at predict."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss, paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from models.backbone import FPN_STRIDES
from models.heads.base import Features, TaskHead, zero_loss
from models.heads.instances import sample_rois, trainable_instances
from models.heads.registry import register_head

if TYPE_CHECKING:
    from models.config import ModelConfig


@register_head("instance_mask")
class MaskHead(TaskHead):
    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # Pooling from every level keeps all FPN parameters in the graph (an empty level
        # contributes zero gradients), whatever sizes the RoIs have.
        self.roi_pool = MultiScaleRoIAlign(list(FPN_STRIDES), output_size=cfg.mask_roi_size, sampling_ratio=2)
        self.mask_head = MaskRCNNHeads(in_channels, [in_channels] * cfg.mask_head_convs, dilation=1)
        # No background class: RoIs come with their class (ground truth or detection label).
        self.predictor = MaskRCNNPredictor(in_channels, in_channels, num_classes)
        # torchvision's kaiming(fan_out) init of the 1x1 logits layer gives logits in the tens
        # for a handful of classes (fan_out = num_classes); start near 0 as Detectron2 does.
        nn.init.normal_(self.predictor.mask_fcn_logits.weight, std=0.001)
        self.max_rois_per_image = cfg.max_rois_per_image

    def _logits(self, features: Features, boxes: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        pooled = self.roi_pool(features, boxes, [image_size] * len(boxes))
        return self.predictor(self.mask_head(pooled))

    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor
    ) -> tuple[Tensor, int]:
        chosen, boxes = sample_rois(
            targets, labelled, eligible=trainable_instances, max_per_image=self.max_rois_per_image
        )
        # With no RoI at all the heads run on an empty batch, which keeps every parameter
        # in the graph with zero gradients.
        logits = self._logits(features, boxes, image_size)
        num_labelled = int(labelled.sum())
        if logits.shape[0] == 0:
            return zero_loss(logits), num_labelled
        used = [b for b, i in enumerate(chosen) if i.numel()]
        loss = maskrcnn_loss(
            logits,
            [boxes[b] for b in used],
            [targets[b]["masks"] for b in used],
            [targets[b]["labels"] for b in used],
            [chosen[b] for b in used],
        )
        return loss, num_labelled

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]]:
        if detections is None:
            raise ValueError("the instance_mask head predicts on detections; pass detections=")
        boxes = [d["boxes"] for d in detections]
        probs = maskrcnn_inference(self._logits(features, boxes, image_size), [d["labels"] for d in detections])
        return [{"masks": paste_masks_in_image(p, b, image_size)} for p, b in zip(probs, boxes)]
