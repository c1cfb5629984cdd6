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


def source_classes(classes: list[int]) -> list[int]:
    """A source's label-space indices (raw class id -> index), each once, in its own class order."""
    return list(dict.fromkeys(classes))


def ranked_classes(logits: Tensor, *, classes: list[int]) -> tuple[list[int], list[float]]:
    """The source's classes (label-space indices), best first, and their softmax
    probabilities over the source's classes only."""
    index = torch.tensor(source_classes(classes), device=logits.device)
    source_logits = logits[index].float()
    order = source_logits.argsort(descending=True, stable=True)
    return index[order].tolist(), source_logits.softmax(dim=0)[order].tolist()


def topk_hits(logits: Tensor, label: int, *, classes: list[int]) -> dict[int, int]:
    """{k: 1 if ``label`` is among the top-k of the source's classes else 0} for k in ``TOP_K``."""
    ranked, _ = ranked_classes(logits, classes=classes)
    return {k: int(label in ranked[:k]) for k in TOP_K}


def class_confusion(labels: list[int], predictions: list[int], *, classes: list[int]) -> list[list[int]]:
    """Image counts over ``source_classes(classes)``: row = truth, column = top-1 prediction."""
    position = {c: i for i, c in enumerate(source_classes(classes))}
    matrix = [[0] * len(position) for _ in position]
    for label, prediction in zip(labels, predictions):
        matrix[position[label]][position[prediction]] += 1
    return matrix


def classification_scores(records: list[dict]) -> dict[str, float]:
    """Top-k accuracy over per-image records (``label``, and ``top``: the best classes in
    order, at least max(``TOP_K``) of them or all the source has)."""
    count = len(records)
    return {f"top{k}": sum(r["label"] in r["top"][:k] for r in records) / count if count else 0.0 for k in TOP_K}
