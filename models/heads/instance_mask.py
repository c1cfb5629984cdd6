"""Mask R-CNN mask branch cascaded on boxes: ground-truth boxes in training, detections at predict."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss, paste_masks_in_image

from models.heads.base import Features
from models.heads.instances import RoICascadeHead, trainable_instances
from models.heads.registry import register_head

if TYPE_CHECKING:
    from models.config import ModelConfig


@register_head("instance_mask")
class MaskHead(RoICascadeHead):
    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(roi_size=cfg.mask_roi_size, max_rois_per_image=cfg.max_rois_per_image)
        self.head = MaskRCNNHeads(in_channels, [in_channels] * cfg.mask_head_convs, dilation=1)
        # No background class: RoIs come with their class (ground truth or detection label).
        self.predictor = MaskRCNNPredictor(in_channels, in_channels, num_classes)
        # torchvision's kaiming(fan_out) init of the 1x1 logits layer gives logits in the tens
        # for a handful of classes (fan_out = num_classes); start near 0 as Detectron2 does.
        nn.init.normal_(self.predictor.mask_fcn_logits.weight, std=0.001)

    _eligible = staticmethod(trainable_instances)

    def _roi_loss(self, logits: Tensor, boxes: list[Tensor], targets: list[dict[str, Tensor]],
                  chosen: list[Tensor]) -> Tensor:
        # Each RoI's loss reads only its ground-truth class's mask logits, a class its source
        # annotates: the other classes' mask logits get no loss (coverage needs no mask here).
        return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets], chosen)

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        if detections is None:
            raise ValueError("the instance_mask head predicts on detections; pass detections=")
        boxes = [d["boxes"] for d in detections]
        probs = maskrcnn_inference(self._logits(features, boxes, image_size), [d["labels"] for d in detections])
        return [{"masks": paste_masks_in_image(p, b, image_size)} for p, b in zip(probs, boxes)]
