"""ModelConfig validation: a bad value is a ValueError naming the field."""
from __future__ import annotations

import pytest

from data_pipelines.schema import TASK_TYPES
from models.config import ModelConfig


def test_default_tasks_come_from_the_sources() -> None:
    cfg = ModelConfig()
    assert cfg.tasks is None and cfg.task_specs is None and cfg.backbone_weights is None


def test_the_list_form_names_each_task_after_its_type() -> None:
    specs = ModelConfig(tasks=list(TASK_TYPES)).task_specs
    assert [(t.name, t.type, t.boxes_from) for t in specs] == [
        ("detection", "detection", None), ("instance_mask", "instance_mask", "detection"),
        ("keypoints", "keypoints", "detection"), ("semantic", "semantic", None),
        ("classification", "classification", None)]


def test_named_tasks_several_of_one_type() -> None:
    specs = ModelConfig(tasks={
        "coco": "detection", "driving": "detection", "coco_masks": {"type": "instance_mask", "boxes_from": "coco"},
        "weather": "classification", "daytime": {"type": "classification"}}).task_specs
    assert [(t.name, t.type, t.boxes_from) for t in specs] == [
        ("coco", "detection", None), ("driving", "detection", None), ("coco_masks", "instance_mask", "coco"),
        ("weather", "classification", None), ("daytime", "classification", None)]
    # With one detection task, a cascade takes its boxes without saying so.
    only = ModelConfig(tasks={"things": "detection", "people": "keypoints"}).task_specs
    assert only[1].boxes_from == "things"


@pytest.mark.parametrize("tasks, message", [
    ({"a": "detection", "b": "detection", "m": "instance_mask"},
     r"tasks\.m: a instance_mask task predicts on a detection task's boxes; there are \['a', 'b'\], so give boxes_from"),
    ({"a": "detection", "k": {"type": "keypoints", "boxes_from": "w"}, "w": "classification"},
     r"tasks\.k: boxes_from 'w' is not a detection task; detection tasks: \['a'\]"),
    ({"w": {"type": "classification", "boxes_from": "a"}, "a": "detection"}, r"tasks\.w: boxes_from is only for"),
    ({"a/b": "detection"}, r"task name 'a/b' must be a non-empty name without '/'"),
    ({"a": "depth"}, r"tasks\.a: unknown type 'depth'"),
    ({"a": {"type": "detection", "colour": "red"}}, r"tasks\.a: expected a task type or \{type"),
])
def test_bad_named_tasks_name_the_task(tasks: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(tasks=tasks)


@pytest.mark.parametrize(
    "field, value",
    [
        ("backbone", "vgg11"),
        ("tasks", ["detection", "depth"]),
        ("tasks", []),
        ("tasks", ["semantic", "semantic"]),
        ("tasks", ["instance_mask", "semantic"]),  # cascade head without detection
        ("trainable_backbone_layers", 6),
        ("fpn_channels", 100),
        ("fpn_channels", 32),
        ("semantic_channels", 0),
        ("norm_mean", (0.5, 0.5)),
        ("norm_std", (0.2, 0.0, 0.2)),
        ("size_divisible", 0),
        ("detection_score_thresh", 1.5),
        ("max_rois_per_image", 0),
        ("fcos_center_sampling_radius", 0.0),
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ModelConfig("resnet18")  # type: ignore[misc]
