"""What each validation source is scored on, and the id mappings its scoring needs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from torch import Tensor

from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest

# COCOeval iouType of each instance-level task.
IOU_TYPES: dict[str, str] = {"detection": "bbox", "instance_mask": "segm", "keypoints": "keypoints"}


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    name: str
    iou_types: tuple[str, ...]  # COCOeval iou types, in IOU_TYPES order
    annotation_file: str | None  # the source's COCO json, in its directory (iou types only)
    # label-space index -> the source's category id; None: the source has no thing classes
    # of its own (keypoint-only), so its detections only carry keypoints.
    index_to_category: dict[int, int] | None
    keypoint_category_ids: tuple[int, ...]  # categories whose annotations carry keypoints
    kpt_oks_sigmas: list[float] | None  # the source's own OKS sigmas
    # The model's (unified) keypoint index of each of the source's keypoints, in its order;
    # None: not scored on keypoints
    keypoint_indices: tuple[int, ...] | None
    semantic_classes: list[int] | None  # the source's label-space indices; None: not scored
    # Per classification task the source feeds (one per image-label field): the label-space
    # indices of its classes, and their names by index.
    image_classes: dict[str, list[int]] = field(default_factory=dict)
    image_class_names: dict[str, dict[int, str]] = field(default_factory=dict)
    num_semantic_classes: int  # label-space size, the confusion matrix side
    # The tasks (model heads) whose outputs this source is scored on, with the detection
    # tasks its cascade tasks take boxes from: one task per type, several classification
    # tasks (see outputs_of).
    tasks: tuple[str, ...] = ()


def source_spec(manifest: Manifest, label_space: LabelSpace) -> SourceSpec:
    """The spec of a validation source bound to the model's tasks (``map_eval_sources``)."""
    fed = label_space.source_tasks[manifest.name]
    tasks = set(fed)
    iou_types = tuple(iou for task, iou in IOU_TYPES.items() if task in tasks)
    if iou_types and not manifest.annotation_file:
        raise ValueError(
            f"validation source {manifest.name!r} labels {sorted(tasks & set(IOU_TYPES))} but its manifest names no "
            f"annotation_file; COCO metrics score against the original json "
            f"(convert it with `polytask data convert coco`)"
        )
    mapping = label_space.category_to_index.get(manifest.name)
    keypoint_ids: tuple[int, ...] = ()
    # Absolute, so the summary names it wherever the run was started from.
    ground_truth = manifest.annotation_path()
    annotation_file = os.path.abspath(ground_truth) if iou_types and ground_truth else None
    if "keypoints" in iou_types:
        assert annotation_file is not None  # checked above
        keypoint_ids = _keypoint_category_ids(annotation_file)
        if mapping is None and len(keypoint_ids) != 1:
            raise ValueError(
                f"validation source {manifest.name!r} labels keypoints but not detection, so its detections can "
                f"only be given one category; its annotation file has keypoint categories {list(keypoint_ids)}"
            )
    return SourceSpec(
        name=manifest.name,
        iou_types=iou_types,
        annotation_file=annotation_file,
        index_to_category=None if mapping is None else {index: cid for cid, index in mapping.items()},
        keypoint_category_ids=keypoint_ids,
        kpt_oks_sigmas=list(manifest.keypoints.sigmas) if "keypoints" in iou_types and manifest.keypoints else None,
        keypoint_indices=tuple(label_space.keypoint_remap[manifest.name]) if "keypoints" in iou_types else None,
        semantic_classes=label_space.semantic_remap[manifest.name] if "semantic" in tasks else None,
        image_classes={task: label_space.class_remap[manifest.name][label]
                       for label, task in label_space.label_tasks(manifest.name).items()},
        image_class_names={task: {i: label_space.classes[task][i] for i in label_space.class_remap[manifest.name][label]}
                           for label, task in label_space.label_tasks(manifest.name).items()},
        num_semantic_classes=len(label_space.classes[fed["semantic"]]) if "semantic" in tasks else 0,
        tasks=_scored_tasks(fed, label_space),
    )


def _scored_tasks(fed: dict[str, str], label_space: LabelSpace) -> tuple[str, ...]:
    names = list(fed.values())
    boxes = [label_space.task(n).boxes_from for n in names if label_space.task(n).boxes_from is not None]
    return tuple(dict.fromkeys([*boxes, *names]))


def outputs_of(output: dict[str, dict[str, Tensor]], spec: SourceSpec) -> dict[str, Tensor]:
    """One image's ``MultiTaskModel.predict`` outputs (per task name) as the flat dict its
    source's instances and semantic mask are scored on: those tasks have one type each, so
    their keys (boxes, masks, keypoints, semantic_logits) do not collide. Classification
    tasks, which may be several, are read per task (``output[task]["class_logits"]``)."""
    flat: dict[str, Tensor] = {}
    for task in spec.tasks:
        if task not in spec.image_classes:
            flat.update(output[task])
    return flat


def _keypoint_category_ids(annotation_file: str) -> tuple[int, ...]:
    # Only the validation json is read here, once per evaluation; it is small next to a training one.
    with open(annotation_file) as f:
        try:
            categories = json.load(f)["categories"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{annotation_file}: not a COCO json with 'categories' ({e})") from None
    return tuple(c["id"] for c in categories if c.get("keypoints"))
