"""Joint augmentation of a decoded sample: image, boxes, masks, keypoints and semantic
mask move together (``torchvision.transforms.v2`` dispatches on the tv_tensor types).

Per-instance tensors (``INSTANCE_KEYS``) stay aligned: an instance whose box degenerates
is dropped from all of them at once.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.streaming.config import TransformConfig

INSTANCE_KEYS: tuple[str, ...] = ("boxes", "labels", "iscrowd", "masks", "keypoints", "keypoint_visibility")


def build_train_transforms(cfg: TransformConfig, *, flip_permutation: list[int] | None) -> Callable[[dict], dict]:
    """Scale jitter + random crop (square) or an aspect-preserving multi-scale resize
    (short_side), horizontal flip, colour jitter; see :class:`TransformConfig`.

    Every geometric step is followed by the instance clean-up (clip boxes, hide
    keypoints outside the image, drop instances whose box vanished), so after each
    step boxes lie inside the image and per-instance tensors stay aligned.
    ``flip_permutation`` (``KeypointSchema.flip_permutation()``) swaps left/right
    keypoints on a flip; None is only valid when no sample has keypoints.
    Normalisation is not here: the model normalises (``model.norm_mean/norm_std``), so
    that training and evaluation share it and it runs on the accelerator.
    """
    size = cfg.image_size
    steps: list[Callable[[dict], dict]] = []
    if cfg.resize == "short_side":
        assert cfg.max_size is not None  # TransformConfig fills it in
        steps.append(KeepInstancesConsistent(ShortSideResize(size, max_size=cfg.max_size, scale_range=cfg.scale_range)))
    elif cfg.scale_range == (1.0, 1.0):
        steps.append(KeepInstancesConsistent(Resize(size)))
    else:
        steps.append(KeepInstancesConsistent(SquareScaleJitter(size, scale_range=cfg.scale_range)))
        fill = {tv_tensors.Image: 0, SemanticMask: IGNORE_INDEX, "others": 0}
        steps.append(KeepInstancesConsistent(v2.RandomCrop((size, size), pad_if_needed=True, fill=fill)))
    steps.append(HorizontalFlip(p=cfg.hflip_prob, flip_permutation=flip_permutation))
    if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        # Last: on the final, small image, which is cheaper.
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return TrainTransforms(steps)


def build_eval_transforms(cfg: TransformConfig) -> Callable[[dict], dict]:
    """Deterministic resize to the training size (short_side: with s = 1); annotations are
    kept as they are."""
    if cfg.resize == "short_side":
        assert cfg.max_size is not None  # TransformConfig fills it in
        return ShortSideResize(cfg.image_size, max_size=cfg.max_size, scale_range=(1.0, 1.0))
    return v2.Compose([v2.Resize((cfg.image_size, cfg.image_size), antialias=True)])


class SemanticMask(tv_tensors.Mask):
    """A semantic mask inside the training transforms: a Mask to every kernel, but its
    own type for padding, which must fill it with ``IGNORE_INDEX`` where instance masks
    get 0."""


class TrainTransforms:
    """The training steps in order (``steps`` is public so tests can check each one)."""

    def __init__(self, steps: list[Callable[[dict], dict]]) -> None:
        self.steps = steps

    def __call__(self, sample: dict) -> dict:
        if "semantic" in sample:
            sample = {**sample, "semantic": sample["semantic"].as_subclass(SemanticMask)}
        for step in self.steps:
            sample = step(sample)
        if "semantic" in sample:
            sample["semantic"] = sample["semantic"].as_subclass(tv_tensors.Mask)
        return sample


class Resize:
    """``v2.Resize((size, size), antialias=True)`` on a sample dict, by calling the resize
    kernel on each tv_tensor directly: the same results without ``v2.Transform``'s
    per-call flattening and type dispatch, a third of the step's time on a small image."""

    def __init__(self, size: int) -> None:
        self.size = [size, size]

    def __call__(self, sample: dict) -> dict:
        return {
            k: F.resize(v, self.size, antialias=True) if isinstance(v, tv_tensors.TVTensor) else v
            for k, v in sample.items()
        }


class SquareScaleJitter(v2.ScaleJitter):
    """``v2.ScaleJitter`` to a square: resize to (s * size)^2, ignoring the aspect ratio
    as the plain resize (and evaluation) do, in one resampling."""

    def __init__(self, size: int, *, scale_range: tuple[float, float]) -> None:
        super().__init__((size, size), scale_range=scale_range, antialias=True)

    def make_params(self, flat_inputs: list) -> dict:
        low, high = self.scale_range
        side = max(1, round(self.target_size[0] * float(low + torch.rand(()) * (high - low))))
        return {"size": (side, side)}


class ShortSideResize:
    """Detectron2's ``ResizeShortestEdge``: one factor for both axes, so that the shorter
    side becomes s * ``size`` unless the longer one would pass s * ``max_size``; s uniform
    in ``scale_range``. Every tv_tensor is resized as :class:`Resize` does."""

    def __init__(self, size: int, *, max_size: int, scale_range: tuple[float, float]) -> None:
        self.size = size
        self.max_size = max_size
        self.scale_range = scale_range

    def output_size(self, height: int, width: int, s: float) -> list[int]:
        """The (height, width) an image of this size is resized to at scale ``s``."""
        factor = min(s * self.size / min(height, width), s * self.max_size / max(height, width))
        return [max(1, round(height * factor)), max(1, round(width * factor))]

    def __call__(self, sample: dict) -> dict:
        low, high = self.scale_range
        # No random draw at a fixed scale: evaluation stays deterministic and leaves the RNG alone.
        s = low if low == high else float(low + torch.rand(()) * (high - low))
        size = self.output_size(*sample["image"].shape[-2:], s)
        return {
            k: F.resize(v, size, antialias=True) if isinstance(v, tv_tensors.TVTensor) else v
            for k, v in sample.items()
        }


class KeepInstancesConsistent:
    """Runs a geometric step, then clips boxes to the image, hides keypoints outside it
    and drops instances whose box became empty."""

    def __init__(self, step: Callable[[dict], dict]) -> None:
        self.step = step
        self._sanitize = SanitizeInstances()

    def __call__(self, sample: dict) -> dict:
        out = self.step(sample)
        if len(out["boxes"]) == 0:  # nothing to clean up; skips the clean-up's fixed cost
            return out
        # What v2.ClampBoundingBoxes does to the sample, without its per-call dispatch.
        out = hide_outside_keypoints({**out, "boxes": F.clamp_bounding_boxes(out["boxes"])})
        boxes = out["boxes"]
        sizes = boxes.as_subclass(torch.Tensor)[:, 2:] - boxes.as_subclass(torch.Tensor)[:, :2]
        if boxes.format == tv_tensors.BoundingBoxFormat.XYXY and (sizes >= SanitizeInstances.MIN_SIZE).all():
            # Clamped, and none too small: the sanitizer (as costly as a resize) would drop nothing.
            return out
        return self._sanitize(out)


class HorizontalFlip:
    """Random horizontal flip that also relabels left/right keypoints.

    Mirroring puts the left hand where the right hand was; without the permutation the
    model would learn left and right swapped on half the samples.
    """

    def __init__(self, *, p: float, flip_permutation: list[int] | None) -> None:
        self.p = p
        self.permutation = None if flip_permutation is None else torch.tensor(flip_permutation)

    def __call__(self, sample: dict) -> dict:
        if torch.rand(()) >= self.p:
            return sample
        # What v2.RandomHorizontalFlip(p=1) does to the sample (each tv_tensor through its
        # flip kernel, everything else as it is), without its per-call flattening and
        # type dispatch, as in Resize.
        out = {k: F.horizontal_flip(v) if isinstance(v, tv_tensors.TVTensor) else v for k, v in sample.items()}
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

    MIN_SIZE = 1.0  # boxes narrower or lower than this (pixels) are dropped

    def __init__(self) -> None:
        self._sanitize = v2.SanitizeBoundingBoxes(min_size=self.MIN_SIZE, labels_getter=_instance_labels)

    def __call__(self, sample: dict) -> dict:
        instances = self._sanitize({k: sample[k] for k in INSTANCE_KEYS if k in sample})
        if "keypoints" in instances:
            # Sanitize returns "labels" as plain tensors; keypoints keep their tv_tensor type.
            instances["keypoints"] = tv_tensors.wrap(instances["keypoints"], like=sample["keypoints"])
        return {**sample, **instances}


def _instance_labels(instances: dict) -> list[torch.Tensor]:
    # Everything per-instance that SanitizeBoundingBoxes would not find on its own (it finds masks).
    return [instances[k] for k in ("labels", "iscrowd", "keypoints", "keypoint_visibility") if k in instances]
