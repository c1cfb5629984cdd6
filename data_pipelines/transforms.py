"""Joint augmentation of a decoded sample: image, boxes, masks, keypoints and semantic
mask move together (``torchvision.transforms.v2`` dispatches on the tv_tensor types).

Per-instance tensors (``INSTANCE_KEYS``) stay aligned: an instance whose box degenerates
is dropped from all of them at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

INSTANCE_KEYS: tuple[str, ...] = ("boxes", "labels", "iscrowd", "masks", "keypoints", "keypoint_visibility")


@dataclass(kw_only=True)
class TransformConfig:
    image_size: int = 128  # every image becomes image_size x image_size, so batches stack
    hflip_prob: float = 0.5
    # Scale jitter: smallest random crop as a fraction of the image area (RandomResizedCrop);
    # 1.0 disables cropping (plain resize).
    min_crop_area: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"TransformConfig.image_size must be >= 1, got {self.image_size}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"TransformConfig.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise ValueError(f"TransformConfig.min_crop_area must be in (0, 1], got {self.min_crop_area}")


def build_train_transforms(cfg: TransformConfig, *, flip_permutation: list[int] | None) -> Callable[[dict], dict]:
    """Random crop/resize to a square, horizontal flip, then drop instances whose box vanished.

    ``flip_permutation`` (``KeypointSchema.flip_permutation()``) swaps left/right keypoints
    on a flip; None is only valid when no sample has keypoints.
    """
    size = (cfg.image_size, cfg.image_size)
    geometry = (
        v2.Resize(size, antialias=True)
        if cfg.min_crop_area == 1.0
        else v2.RandomResizedCrop(size, scale=(cfg.min_crop_area, 1.0), antialias=True)
    )
    return v2.Compose(
        [
            geometry,
            HorizontalFlip(p=cfg.hflip_prob, flip_permutation=flip_permutation),
            v2.ClampBoundingBoxes(),
            hide_outside_keypoints,
            SanitizeInstances(),
        ]
    )


def build_eval_transforms(cfg: TransformConfig) -> Callable[[dict], dict]:
    """Deterministic resize to the training size; annotations are kept as they are."""
    return v2.Compose([v2.Resize((cfg.image_size, cfg.image_size), antialias=True)])


class HorizontalFlip:
    """Random horizontal flip that also relabels left/right keypoints.

    Mirroring puts the left hand where the right hand was; without the permutation the
    model would learn left and right swapped on half the samples.
    """

    def __init__(self, *, p: float, flip_permutation: list[int] | None) -> None:
        self.p = p
        self.permutation = None if flip_permutation is None else torch.tensor(flip_permutation)
        self._flip = v2.RandomHorizontalFlip(p=1.0)

    def __call__(self, sample: dict) -> dict:
        if torch.rand(()) >= self.p:
            return sample
        out = self._flip(sample)
        if "keypoints" in out:
            if self.permutation is None:
                raise ValueError(f"sample {out.get('key')!r} has keypoints but no flip_permutation was given")
            out["keypoints"] = tv_tensors.wrap(out["keypoints"][:, self.permutation], like=out["keypoints"])
            out["keypoint_visibility"] = out["keypoint_visibility"][:, self.permutation]
        return out


def hide_outside_keypoints(sample: dict) -> dict:
    """Set visibility 0 for keypoints a crop moved off the image (visibility never rises)."""
    if "keypoints" not in sample:
        return sample
    height, width = sample["keypoints"].canvas_size
    x, y = sample["keypoints"].as_subclass(torch.Tensor).unbind(-1)
    # Pixel-index convention, as torchvision's keypoint flip (x -> W - 1 - x) assumes.
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return {**sample, "keypoint_visibility": sample["keypoint_visibility"] * inside}


class SanitizeInstances:
    """Clamp-and-drop of degenerate boxes, applied to every per-instance tensor together.

    Only the per-instance entries go through ``v2.SanitizeBoundingBoxes``: it indexes any
    Mask whose first dim happens to equal the box count, which would corrupt an [H, W]
    semantic mask with H == N.
    """

    def __init__(self) -> None:
        self._sanitize = v2.SanitizeBoundingBoxes(labels_getter=_instance_labels)

    def __call__(self, sample: dict) -> dict:
        instances = self._sanitize({k: sample[k] for k in INSTANCE_KEYS if k in sample})
        if "keypoints" in instances:
            # Sanitize returns "labels" as plain tensors; keypoints keep their tv_tensor type.
            instances["keypoints"] = tv_tensors.wrap(instances["keypoints"], like=sample["keypoints"])
        return {**sample, **instances}


def _instance_labels(instances: dict) -> list[torch.Tensor]:
    # Everything per-instance that SanitizeBoundingBoxes would not find on its own (it finds masks).
    return [instances[k] for k in ("labels", "iscrowd", "keypoints", "keypoint_visibility") if k in instances]
