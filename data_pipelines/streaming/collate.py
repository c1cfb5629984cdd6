"""Per-sample dicts (after transforms) -> :class:`Batch`."""
from __future__ import annotations

import torch

from data_pipelines.schema import Batch
from data_pipelines.streaming.shared_memory import empty_for_transport

TARGET_KEYS: tuple[str, ...] = (
    "boxes",
    "labels",
    "iscrowd",
    "masks",
    "keypoints",
    "keypoint_visibility",
    "semantic",
    "class_label",
    # Coverage vectors (schema.COVERAGE_KEYS), present only for sources that annotate part
    # of a task's classes; batch_transport carries them as it carries per-instance rows.
    "thing_coverage",
    "semantic_coverage",
    "class_coverage",
)


def collate(samples: list[dict]) -> Batch:
    """Stack images (float32 in [0, 1]) and task masks; targets stay per sample as plain tensors."""
    images = torch.stack(sample_images(samples))
    return Batch(
        images=images_to_float(images, out=empty_for_transport(images.shape, torch.float32)),
        # Plain tensors: tv_tensor metadata (canvas_size, format) means nothing to the model.
        targets=[{k: s[k].as_subclass(torch.Tensor) for k in TARGET_KEYS if k in s} for s in samples],
        task_mask=torch.stack([s["task_mask"] for s in samples]),
        keys=[s["key"] for s in samples],
        sources=[s["source"] for s in samples],
    )


def sample_images(samples: list[dict]) -> list[torch.Tensor]:
    """The samples' uint8 images as plain tensors, after checking that they stack."""
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"cannot stack images of shapes {sorted(sizes)} (keys {[s['key'] for s in samples]}); "
            f"the transforms must resize to one size"
        )
    return [s["image"].as_subclass(torch.Tensor) for s in samples]


def images_to_float(images: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], with the arithmetic of F.to_dtype(..., scale=True)."""
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32)
    return out.copy_(images).mul_(1.0 / 255)
