"""Per-sample dicts (after transforms) -> :class:`Batch`."""
from __future__ import annotations

import torch

from data_pipelines.schema import Batch
from data_pipelines.shared_memory import empty_for_transport

TARGET_KEYS: tuple[str, ...] = (
    "boxes",
    "labels",
    "iscrowd",
    "masks",
    "keypoints",
    "keypoint_visibility",
    "semantic",
    "class_label",
)


def collate(samples: list[dict]) -> Batch:
    """Stack images (float32 in [0, 1]) and task masks; targets stay per sample as plain tensors."""
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"cannot stack images of shapes {sorted(sizes)} (keys {[s['key'] for s in samples]}); "
            f"the transforms must resize to one size"
        )
    images = torch.stack([s["image"].as_subclass(torch.Tensor) for s in samples])
    return Batch(
        images=_to_float(images),
        # Plain tensors: tv_tensor metadata (canvas_size, format) means nothing to the model.
        targets=[{k: s[k].as_subclass(torch.Tensor) for k in TARGET_KEYS if k in s} for s in samples],
        task_mask=torch.stack([s["task_mask"] for s in samples]),
        keys=[s["key"] for s in samples],
        sources=[s["source"] for s in samples],
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], with the arithmetic of F.to_dtype(..., scale=True)."""
    return empty_for_transport(images.shape, torch.float32).copy_(images).mul_(1.0 / 255)
