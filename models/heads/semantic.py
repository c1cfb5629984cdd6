"""Light semantic FPN head: every level -> conv, upsampled to P3 and summed, 1x1 classifier."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from data_pipelines.schema import IGNORE_INDEX
from models.backbone import FPN_STRIDES
from models.heads.base import Features, TaskHead, coverage_rows, labelled_subset, zero_loss
from models.heads.registry import register_head

if TYPE_CHECKING:
    from models.config import ModelConfig


@register_head("semantic")
class SemanticFPNHead(TaskHead):
    def __init__(self, *, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # All levels, P6/P7 included: cheap global context, and every FPN parameter stays
        # in the graph even when semantic is the only task.
        self.levels = nn.ModuleDict(
            {
                name: Conv2dNormActivation(in_channels, cfg.semantic_channels, norm_layer=partial(nn.GroupNorm, 32))
                for name in FPN_STRIDES
            }
        )
        self.classifier = nn.Conv2d(cfg.semantic_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self.ignore_unannotated = cfg.unannotated_classes == "ignore"

    def _logits(self, features: Features, image_size: tuple[int, int]) -> Tensor:
        size = features["p3"].shape[-2:]
        merged = sum(
            F.interpolate(conv(features[name]), size=size, mode="bilinear", align_corners=False)
            for name, conv in self.levels.items()
        )
        return F.interpolate(self.classifier(merged), size=image_size, mode="bilinear", align_corners=False)

    def loss(
        self, features: Features, image_size: tuple[int, int], targets: list[dict[str, Tensor]], labelled: Tensor, *,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[Tensor, int]:
        subset, index = labelled_subset(features, labelled)
        logits = self._logits(subset, image_size)
        if index.numel() == 0:
            return zero_loss(logits), 0
        labels = torch.stack([targets[i]["semantic"] for i in index.tolist()])
        # Images were padded bottom/right; the labels cover the unpadded part.
        logits = logits[..., : labels.shape[-2], : labels.shape[-1]]
        coverage = coverage_rows(targets, index, "semantic_coverage", self.num_classes) if self.ignore_unannotated else None
        if coverage is not None:
            # The softmax of each sample runs over its source's classes only: the others get
            # -inf (probability exactly 0, gradient exactly 0) on its pixels.
            logits = torch.where(coverage[:, :, None, None], logits, float("-inf"))
        summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        # Mean over labelled pixels, and an exact 0 (not NaN) when every pixel is ignored.
        return summed / (labels != IGNORE_INDEX).sum().clamp(min=1), index.numel()

    @torch.no_grad()
    def predict(
        self, features: Features, image_size: tuple[int, int], *, detections: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        logits = self._logits(features, image_size)
        return [{"semantic_logits": x, "semantic": x.argmax(dim=0)} for x in logits]
