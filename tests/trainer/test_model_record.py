"""The checkpoint record of the model's tasks and outputs (meta.json): what it holds, the
differences it refuses, and records written before tasks had names."""
from __future__ import annotations

import pytest

from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import Manifest, ShardInfo
from data_pipelines.tasks import parse_tasks
from models.config import ModelConfig
from trainer.checkpoint.compatibility import check_model_record, model_record
from trainer.checkpoint.errors import CheckpointLoadError

MANIFESTS = [
    Manifest(name="coco", tasks=["detection", "instance_mask"], shards=[ShardInfo(path="a.tar", num_samples=1)],
             categories=[{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]),
    Manifest(name="sky", tasks=["classification"], shards=[ShardInfo(path="a.tar", num_samples=1)],
             classes=["sun", "rain"]),
]
CFG = ModelConfig()


def test_a_record_from_before_named_tasks_reads_as_tasks_named_after_their_types():
    space = build_label_space(MANIFESTS)  # derived: detection, instance_mask, classification
    legacy = {"tasks": ["detection", "instance_mask", "classification"], "fcos_box_activation": "softplus",
              "outputs": {"thing_classes": ["person", "dog"], "semantic_classes": [], "image_classes": ["sun", "rain"],
                          "keypoints": []}}
    check_model_record("ck", legacy, label_space=space, model_cfg=CFG)  # the same model: accepted
    legacy["outputs"]["image_classes"] = ["rain", "sun"]
    with pytest.raises(CheckpointLoadError, match=r"classification: the same names in another order"):
        check_model_record("ck", legacy, label_space=space, model_cfg=CFG)


def test_named_tasks_are_recorded_and_a_rename_is_refused_with_the_differences():
    tasks = parse_tasks({"things": "detection", "masks": "instance_mask", "weather": "classification"})
    space = build_label_space(MANIFESTS, tasks)
    record = model_record(space, CFG)
    assert record["tasks"] == [{"name": "things", "type": "detection", "boxes_from": None},
                               {"name": "masks", "type": "instance_mask", "boxes_from": "things"},
                               {"name": "weather", "type": "classification", "boxes_from": None}]
    assert record["outputs"] == {"things": ["person", "dog"], "masks": ["person", "dog"], "weather": ["sun", "rain"]}
    check_model_record("ck", record, label_space=space, model_cfg=CFG)
    renamed = build_label_space(MANIFESTS, parse_tasks({"things": "detection", "masks": "instance_mask",
                                                        "sky": "classification"}))
    with pytest.raises(CheckpointLoadError) as error:
        check_model_record("ck", record, label_space=renamed, model_cfg=CFG)
    message = str(error.value)
    assert "tasks: the checkpoint has [things (detection), masks (instance_mask, boxes from things), weather " \
           "(classification)], the config (model.tasks) [things (detection), masks (instance_mask, boxes from " \
           "things), sky (classification)]" in message
    assert "weather: only in the checkpoint ['sun', 'rain']" in message and "sky: only in the config" in message
