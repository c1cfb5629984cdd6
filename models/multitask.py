"""The multi-task model: normalisation + padding, shared backbone/FPN, one head per task."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from data_pipelines.schema import Batch
from data_pipelines.tasks import TaskSpec, check_cascades, parse_tasks
from models.backbone import build_backbone
from models.config import ModelConfig
from models.heads import build_head
from models.heads.base import Features


class GradientTaps:
    """The tensors per-task gradient statistics differentiate: the heads' losses and z as
    computed, before :meth:`MultiTaskModel.forward` returns them (as views).

    Engines hook the tensors a forward returns: DeepSpeed starts its backward bookkeeping
    (and queues its gradient reduction) at the first backward through any of them, so
    statistics passes taken from the returned tensors would run its epilogue before the
    real backward. This plain class is not traversed; the passes from here touch no hook.
    """

    def __init__(self, losses: dict[str, Tensor], features: Features) -> None:
        self.losses = losses
        self.features = features


class MultiTaskOutput(NamedTuple):
    losses: dict[str, Tensor]  # per task: mean over the local samples labelled for it
    counts: dict[str, int]  # per task: local labelled samples
    features: Features  # z, attached to the trunk
    head_features: Features  # what the heads ran on: z itself, or z detached
    taps: GradientTaps | None = None  # with detached features: what gradient statistics differentiate


class MultiTaskModel(nn.Module):
    """Images in [0, 1] -> normalised, padded -> backbone + FPN (p3..p7) -> one head per task.

    Heads are keyed by task name and built by task type; ``tasks`` (``LabelSpace.tasks``,
    in the order of the batch's task mask columns) default to ``cfg.task_specs``, else one
    task per key of ``num_classes``, each a task type. ``num_classes`` gives each task's
    output size (``LabelSpace.num_classes()``; the number of keypoints for a keypoint task).
    """

    def __init__(self, cfg: ModelConfig, *, num_classes: dict[str, int], tasks: list[TaskSpec] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.tasks = tasks or cfg.task_specs or parse_tasks(list(num_classes), where="num_classes")
        check_cascades(self.tasks)
        missing = [t.name for t in self.tasks if t.name not in num_classes]
        if missing:
            raise ValueError(f"num_classes: no entry for task(s) {missing}")
        self.heads = nn.ModuleDict(
            {
                t.name: build_head(t.type, cfg=cfg, in_channels=self.backbone.out_channels,
                                   num_classes=num_classes[t.name], name=t.name)
                for t in self.tasks
            }
        )
        self.register_buffer("mean", torch.tensor(cfg.norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.norm_std).view(1, 3, 1, 1), persistent=False)
        if cfg.channels_last:  # 4-d weights only; a later .to(device) keeps the layout
            self.to(memory_format=torch.channels_last)

    def padded_size(self, images: Tensor) -> tuple[int, int]:
        """Size of ``images`` after padding, the frame the heads work in."""
        d = self.cfg.size_divisible
        return math.ceil(images.shape[-2] / d) * d, math.ceil(images.shape[-1] / d) * d

    def forward_features(self, images: Tensor, image_sizes: Sequence[Sequence[int]] | None = None) -> Features:
        """Shared representation: FPN levels p3..p7 of the normalised, padded images.

        ``image_sizes``: each image's (height, width) when ``images`` holds smaller images
        padded bottom/right (``Batch.image_sizes``); None: every image fills ``images``."""
        height, width = self.padded_size(images)
        x = (images - self.mean) / self.std
        # Pad after normalising, with zeros (= the mean colour), as torchvision's detectors do;
        # that includes the padding the batch already holds around its smaller images.
        for i, (h, w) in enumerate(image_sizes if image_sizes is not None else []):
            x[i, :, int(h):, :] = 0
            x[i, :, :, int(w):] = 0
        x = F.pad(x, (0, width - images.shape[-1], 0, height - images.shape[-2]))
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward_heads(self, features: Features, batch: Batch) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Per-task loss over the samples labelled for the task, and how many there are."""
        image_size = self.padded_size(batch.images)
        sizes = _padded_sizes(batch.images, batch.image_sizes)
        losses, counts = {}, {}
        for column, (task, head) in enumerate(self.heads.items()):
            labelled = batch.task_mask[:, column]
            losses[task], counts[task] = head.loss(features, image_size, batch.targets, labelled, image_sizes=sizes)
        return losses, counts

    def forward(self, batch: Batch, *, detach_features: bool = False) -> MultiTaskOutput:
        """Per-task losses and counts, plus the shared features z.

        ``detach_features``: the heads run on z cut from the trunk (leaves that collect the
        heads' gradients), so per-task gradients w.r.t. z cost head-only backward passes
        and the trunk can be given one combined gradient (loss balancing). One call, so
        that a DDP-wrapped model sees a single forward.
        """
        features = self.forward_features(batch.images, _padded_sizes(batch.images, batch.image_sizes))
        head_features = (
            OrderedDict((k, v.detach().requires_grad_(True)) for k, v in features.items())
            if detach_features else features
        )
        losses, counts = self.forward_heads(head_features, batch)
        if not detach_features:
            return MultiTaskOutput(losses=losses, counts=counts, features=features, head_features=head_features)
        taps = GradientTaps(losses, features)
        return MultiTaskOutput(losses={t: v.view_as(v) for t, v in losses.items()}, counts=counts,
                               features=OrderedDict((k, v.view_as(v)) for k, v in features.items()),
                               head_features=head_features, taps=taps)

    @torch.no_grad()
    def predict(
        self, images: Tensor, *, tasks: Sequence[str] | None = None, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, dict[str, Tensor]]]:
        """Per image: task name -> that task's outputs, for ``tasks`` (default: every head),
        in the unpadded image's pixels. A cascade task (masks, keypoints) also runs the
        detection task it takes boxes from; its outputs are per box of that task's.

        ``image_sizes``: each image's (height, width) inside ``images`` when they were padded
        to one size (``Batch.image_sizes``): its dense outputs are cropped to it and its
        boxes clipped to it. None: every image fills ``images``."""
        wanted = set(self.heads) if tasks is None else set(tasks) & set(self.heads)
        wanted |= {t.boxes_from for t in self.tasks if t.name in wanted and t.boxes_from is not None}
        padded = _padded_sizes(images, image_sizes)  # None for a batch of one size: as before
        features = self.forward_features(images, padded)
        image_size = self.padded_size(images)
        results: list[dict[str, dict[str, Tensor]]] = [{} for _ in range(images.shape[0])]
        detections: dict[str, list[dict[str, Tensor]]] = {}
        # Detection tasks first: the cascades pool their boxes.
        for task in sorted((t for t in self.tasks if t.name in wanted), key=lambda t: t.boxes_from is not None):
            outputs = self.heads[task.name].predict(
                features, image_size, detections=detections.get(task.boxes_from), image_sizes=padded)
            if task.type == "detection":
                detections[task.name] = outputs
            for result, output in zip(results, outputs):
                result[task.name] = output
        if image_sizes is None:
            image_sizes = [images.shape[-2:]] * len(results)
        order = [t.name for t in self.tasks if t.name in wanted]  # model.tasks order
        return [{task: _crop(r[task], int(h), int(w)) for task in order} for r, (h, w) in zip(results, image_sizes)]


def _padded_sizes(images: Tensor, image_sizes: Tensor | Sequence[Sequence[int]] | None) -> list[list[int]] | None:
    """``image_sizes`` as lists of ints when some image is smaller than ``images``, else None
    (a square batch: nothing to do, and its features stay exactly as before)."""
    if image_sizes is None:
        return None
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [[int(h), int(w)] for h, w in image_sizes]
    full = [images.shape[-2], images.shape[-1]]
    return None if all(size == full for size in sizes) else sizes


def _crop(result: dict[str, Tensor], height: int, width: int) -> dict[str, Tensor]:
    """Drop the padding from dense outputs and clip boxes to the image."""
    out = {}
    for key, value in result.items():
        if key == "boxes":
            value = clip_boxes_to_image(value, (height, width))
        elif key in ("masks", "semantic_logits", "semantic"):
            value = value[..., :height, :width]
        out[key] = value
    return out


def build_model(cfg: ModelConfig, *, num_classes: dict[str, int], tasks: list[TaskSpec] | None = None) -> MultiTaskModel:
    return MultiTaskModel(cfg, num_classes=num_classes, tasks=tasks)
