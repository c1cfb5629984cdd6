"""Which ground-truth instances the instance-level losses train on."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
