"""Per-sample dicts (after transforms) -> :class:`Batch`."""
from __future__ import annotations

import torch

from data_pipelines.schema import IGNORE_INDEX, TASK_TARGET_PREFIXES, Batch
from data_pipelines.streaming.shared_memory import empty_for_transport

TARGET_KEYS: tuple[str, ...] = (
    "boxes",
    "labels",
    "iscrowd",
    "masks",
    "keypoints",
    "keypoint_visibility",
    "semantic",
    # Coverage vectors (schema.COVERAGE_KEYS), present only for sources that annotate part
    # of a task's classes; batch_transport carries them as it carries per-instance rows.
    "thing_coverage",
    "semantic_coverage",
)
# And the keys per classification task (schema.TASK_TARGET_PREFIXES): class_label/<task>,
# class_coverage/<task>.


def target_keys(samples: list[dict]) -> list[str]:
    """The target keys the samples hold: :data:`TARGET_KEYS` in order, then the per-task ones."""
    per_task = sorted({k for s in samples for k in s if k.startswith(TASK_TARGET_PREFIXES)})
    return [k for k in TARGET_KEYS if any(k in s for s in samples)] + per_task


# What padding (collate's, to the batch's largest image) fills each per-pixel entry with:
# black image, no instance, unlabelled semantic pixel (no loss).
PAD_VALUES: dict[str, int] = {"image": 0, "masks": 0, "semantic": IGNORE_INDEX}


def collate(samples: list[dict]) -> Batch:
    """Stack images (float32 in [0, 1]) and task masks, padded to the batch's largest image
    (see :func:`pad_to_batch`); targets stay per sample as plain tensors."""
    samples, image_sizes = pad_to_batch(samples)
    images = torch.stack(sample_images(samples))
    keys = target_keys(samples)
    return Batch(
        images=images_to_float(images, out=empty_for_transport(images.shape, torch.float32)),
        # Plain tensors: tv_tensor metadata (canvas_size, format) means nothing to the model.
        targets=[{k: s[k].as_subclass(torch.Tensor) for k in keys if k in s} for s in samples],
        task_mask=torch.stack([s["task_mask"] for s in samples]),
        keys=[s["key"] for s in samples],
        sources=[s["source"] for s in samples],
        image_sizes=torch.tensor(image_sizes, dtype=torch.int64),
    )


def pad_to_batch(samples: list[dict]) -> tuple[list[dict], list[tuple[int, int]]]:
    """The samples with image, instance masks and semantic mask padded bottom/right to the
    batch's largest height and width (:data:`PAD_VALUES`), and each sample's unpadded
    (height, width). Boxes and keypoints need nothing: the origin stays. Samples that are
    all one size (square resize) come back as they are."""
    sizes = [(int(s["image"].shape[-2]), int(s["image"].shape[-1])) for s in samples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if all(size == (height, width) for size in sizes):
        return samples, sizes
    padded = []
    for sample, (h, w) in zip(samples, sizes):
        sample = dict(sample)
        for key, fill in PAD_VALUES.items():
            if key in sample and (h, w) != (height, width):
                value = sample[key].as_subclass(torch.Tensor)
                out = value.new_full((*value.shape[:-2], height, width), fill)
                out[..., :h, :w] = value
                sample[key] = out
        padded.append(sample)
    return padded, sizes


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
