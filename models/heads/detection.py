"""Anchor-free FCOS detection on P3-P7, built from torchvision's FCOS pieces."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList

from models.backbone import FPN_STRIDES
from models.heads.base import Features, TaskHead, coverage_rows, labelled_subset, zero_loss
from models.heads.instances import trainable_instances
from models.heads.registry import register_head

if TYPE_CHECKING:
    from models.config import ModelConfig

# What an unannotated class's logit is replaced by in the loss: sigmoid(-1e4) is exactly 0
# in float32, so its focal loss is exactly 0 (an uncovered class is no negative), and the
# replacement cuts the real logit's gradient to exactly 0. (-inf would give 0 * inf = NaN
# in the BCE's target term.)
_UNCOVERED_LOGIT = -1e4


def _softplus_output(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return torch.nn.functional.softplus(output)


@register_head("detection")
class FCOSDetectionHead(TaskHead):
    # torchvision's FCOS model also owns a backbone and a GeneralizedRCNNTransform (resizing,
    # normalisation), which belong to our model. Its center-sampling matching and its
    # postprocessing only read the attributes set in __init__, so borrow them as they are.
    compute_loss = FCOS.compute_loss
    postprocess_detections = FCOS.postprocess_detections

    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # One anchor per location whose size is the level's stride: FCOS's "points".
        self.anchor_generator = AnchorGenerator(
            sizes=tuple((s,) for s in FPN_STRIDES.values()), aspect_ratios=((1.0,),) * len(FPN_STRIDES)
        )
        self.head = FCOSHead(in_channels, num_anchors=1, num_classes=num_classes, num_convs=cfg.fcos_num_convs)
        if cfg.fcos_box_activation == "softplus":
            # torchvision's regression head applies ReLU to bbox_reg's output; made positive
            # first, it passes the ReLU unchanged. A hook, so the parameter names stay.
            self.head.regression_head.bbox_reg.register_forward_hook(_softplus_output)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.center_sampling_radius = cfg.fcos_center_sampling_radius
        self.score_thresh = cfg.detection_score_thresh
        self.nms_thresh = cfg.detection_nms_thresh
        self.detections_per_img = cfg.detections_per_image
        self.topk_candidates = cfg.detection_topk_candidates
        self.num_classes = num_classes
        self.ignore_unannotated = cfg.unannotated_classes == "ignore"

    def _run(
        self, features: Features, image_size: tuple[int, int]
    ) -> tuple[dict[str, Tensor], list[Tensor], list[int]]:
        """Head outputs, FCOS points (anchors) per image, and points per level."""
        levels = list(features.values())
        # bf16 (8-bit mantissa) loses whole pixels of box coordinates: match, decode and
        # score in float32.
        outputs = {k: v.float() for k, v in self.head(levels).items()}
        # The anchor generator reads only sizes, dtype and device of its inputs.
        batch = levels[0].shape[0]
        images = ImageList(levels[0].new_empty((batch, 0, *image_size)), [image_size] * batch)
        grids = [f.new_empty(f.shape[-2:], dtype=torch.float32) for f in levels]
        anchors = self.anchor_generator(images, grids)
        return outputs, anchors, [f.shape[-2] * f.shape[-1] for f in levels]

    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor, *,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[Tensor, int]:
        subset, index = labelled_subset(features, labelled)
        outputs, anchors, per_level = self._run(subset, image_size)
        if index.numel() == 0:
            return zero_loss(*outputs.values()), 0
        coverage = coverage_rows(targets, index, "thing_coverage", self.num_classes) if self.ignore_unannotated else None
        if coverage is not None:
            # Per sample, the classes its source does not annotate are neither positive (no
            # box of theirs is in its targets) nor negative: no loss at all.
            logits = outputs["cls_logits"]
            outputs = {**outputs, "cls_logits": torch.where(coverage[:, None, :], logits, _UNCOVERED_LOGIT)}
        kept = []
        for i in index.tolist():
            keep = trainable_instances(targets[i])
            kept.append({"boxes": targets[i]["boxes"][keep], "labels": targets[i]["labels"][keep]})
        losses = self.compute_loss(kept, outputs, anchors, per_level)
        # classification (focal) + GIoU regression + centerness, each / number of foreground points
        return sum(losses.values()), index.numel()

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        outputs, anchors, per_level = self._run(features, image_size)
        sizes = [image_size] * len(anchors) if image_sizes is None else [tuple(s) for s in image_sizes]
        if image_sizes is not None:
            # A point in an image's padding is not in the image: no detection comes from it
            # (it would take a top-k slot and end as a box clipped to nothing).
            boxes = torch.stack(anchors)  # [B, N, (x1, y1, x2, y2)]
            centres = (boxes[..., :2] + boxes[..., 2:]) / 2
            limits = centres.new_tensor([[w, h] for h, w in sizes])[:, None, :]
            outside = (centres >= limits).any(dim=-1)
            outputs = {**outputs, "cls_logits": outputs["cls_logits"].masked_fill(outside[..., None], float("-inf"))}
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, sizes)
