"""Semantic segmentation (confusion matrix -> mIoU, pixel accuracy) and classification
(top-1 / top-5), both scored within the source's own classes.

A source is scored on its own label set: the model's merged label space may hold classes
that the source never annotates, and predicting one of those cannot be right or wrong there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipelines.schema import IGNORE_INDEX

TOP_K = (1, 5)


def semantic_confusion(logits: Tensor, target: Tensor, *, classes: list[int], num_classes: int) -> Tensor:
    """int64 [num_classes, num_classes] pixel counts, row = truth, column = prediction.

    Args:
        logits: [C, h, w] in the resized frame, C = label-space size.
        target: [H, W] label-space indices at the original size, ``IGNORE_INDEX`` = unlabelled.
        classes: the source's label-space indices; the prediction is the best of these.
        num_classes: label-space size.
    """
    index = torch.tensor(sorted(set(classes)), device=logits.device)
    # Only the source's channels are resized: far fewer than the merged space can hold.
    chosen = F.interpolate(logits[index][None].float(), size=tuple(target.shape), mode="bilinear", align_corners=False)
    prediction = index[chosen[0].argmax(dim=0)].cpu()
    valid = target != IGNORE_INDEX
    flat = target[valid] * num_classes + prediction[valid]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def semantic_scores(confusion: Tensor, *, classes: list[int]) -> dict[str, float]:
    """mIoU over the source's classes that occur in truth or prediction, and pixel accuracy."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    index = torch.tensor(sorted(set(classes)))
    # A class absent from both truth and prediction has no IoU (0/0); it is left out, as in mmseg.
    present = index[union[index] > 0]
    iou = true_positive[present] / union[present]
    total = confusion.sum()
    return {
        "mIoU": float(iou.mean()) if present.numel() else 0.0,
        "pixel_acc": float(true_positive.sum() / total) if total > 0 else 0.0,
    }


def topk_hits(logits: Tensor, label: int, *, classes: list[int]) -> dict[int, int]:
    """{k: 1 if ``label`` is among the top-k of the source's classes else 0} for k in ``TOP_K``."""
    index = torch.tensor(classes, device=logits.device)
    ranked = index[logits[index].float().argsort(descending=True, stable=True)].tolist()
    return {k: int(label in ranked[:k]) for k in TOP_K}


def classification_scores(hits: dict[int, int], count: int) -> dict[str, float]:
    return {f"top{k}": hits[k] / count if count else 0.0 for k in TOP_K}
