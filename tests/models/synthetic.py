"""A small synthetic :class:`Batch` with every task's targets, built in memory."""
from __future__ import annotations

import torch

from data_pipelines.schema import IGNORE_INDEX, TASK_TYPES, Batch

NUM_CLASSES = {"detection": 3, "instance_mask": 3, "keypoints": 4, "semantic": 5, "classification": 6}
SIZE = 128


def make_target(seed: int, *, height: int = SIZE, width: int = SIZE, num_instances: int = 2) -> dict[str, torch.Tensor]:
    """One sample's targets: boxes whose masks fill them, keypoints inside them, a semantic
    map painted from the masks (with an unlabelled border), and a class label."""
    g = torch.Generator().manual_seed(seed)
    k = NUM_CLASSES["keypoints"]
    boxes, masks, keypoints = [], [], []
    for _ in range(num_instances):
        x1, w = (torch.randint(lo, width // 2, (), generator=g).item() for lo in (0, 24))
        y1, h = (torch.randint(lo, height // 2, (), generator=g).item() for lo in (0, 24))
        boxes.append([x1, y1, x1 + w, y1 + h])
        mask = torch.zeros(height, width, dtype=torch.uint8)
        mask[y1 : y1 + h, x1 : x1 + w] = 1
        masks.append(mask)
        keypoints.append(torch.stack([x1 + torch.rand(k, generator=g) * w, y1 + torch.rand(k, generator=g) * h], 1))
    labels = torch.randint(0, NUM_CLASSES["detection"], (num_instances,), generator=g)
    semantic = torch.zeros(height, width, dtype=torch.int64)
    for mask, label in zip(masks, labels):
        semantic[mask.bool()] = label + 1
    semantic[:4] = IGNORE_INDEX
    visibility = torch.full((num_instances, k), 2, dtype=torch.int64)
    visibility[:, -1] = 0  # one unlabelled keypoint per instance
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": labels,
        "iscrowd": torch.zeros(num_instances, dtype=torch.bool),
        "masks": torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
        "keypoints": torch.stack(keypoints) if keypoints else torch.zeros(0, k, 2),
        "keypoint_visibility": visibility,
        "semantic": semantic,
        "class_label/classification": torch.randint(0, NUM_CLASSES["classification"], (), generator=g),
    }


def make_batch(
    targets: list[dict[str, torch.Tensor]], *, task_mask: torch.Tensor | None = None, seed: int = 0
) -> Batch:
    """Batch of random images for ``targets``, labelled for every task unless ``task_mask`` says otherwise."""
    height, width = targets[0]["semantic"].shape
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(targets), 3, height, width, generator=g)
    if task_mask is None:
        task_mask = torch.ones(len(targets), len(TASK_TYPES), dtype=torch.bool)
    return Batch(images=images, targets=targets, task_mask=task_mask)
