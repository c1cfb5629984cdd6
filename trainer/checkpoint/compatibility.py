"""Whether a checkpoint's model fits the job: the same tasks, and output indices that mean
the same labels. Shapes alone do not tell: two sources swapped in the config keep every
head's size and swap its classes, and the weights would load and predict the wrong ones."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_pipelines.label_space import LabelSpace, output_differences
from data_pipelines.tasks import CASCADE_TYPES
from models.config import ModelConfig
from trainer.checkpoint.errors import CheckpointLoadError

log = logging.getLogger(__name__)


def model_record(label_space: LabelSpace, model_cfg: ModelConfig) -> dict[str, Any]:
    """What meta.json records of the model's tasks and outputs, and of the settings that
    change what its weights compute (no parameter shape shows them)."""
    return {"tasks": [asdict(t) for t in label_space.tasks], "outputs": label_space.outputs(),
            "fcos_box_activation": model_cfg.fcos_box_activation}


def check_model_record(path: str | Path, meta: dict[str, Any], *, label_space: LabelSpace,
                       model_cfg: ModelConfig) -> None:
    """CheckpointLoadError listing every difference between the checkpoint's tasks, outputs
    and box activation (its meta.json) and the job's; an older checkpoint that records no
    tasks and classes has them loaded as before, with a log line."""
    problems = []
    trained = meta.get("fcos_box_activation", "relu")  # before the setting: torchvision's ReLU
    if any(t.type == "detection" for t in label_space.tasks) and trained != model_cfg.fcos_box_activation:
        problems.append(f"model.fcos_box_activation: the checkpoint's boxes were trained with {trained!r}, the config "
                        f"has {model_cfg.fcos_box_activation!r}; set model.fcos_box_activation={trained} to use it")
    if "outputs" not in meta:
        log.info("checkpoint %s does not record its tasks and classes (an older polytask); not compared", path)
    else:
        saved_tasks, saved_outputs = recorded_tasks(meta)
        current = [asdict(t) for t in label_space.tasks]
        if saved_tasks != current:
            problems.append(f"tasks: the checkpoint has {_describe(saved_tasks)}, the config (model.tasks) "
                            f"{_describe(current)}")
        problems += output_differences(saved_outputs, label_space.outputs())
    if problems:
        raise CheckpointLoadError(f"{path}: the checkpoint's model does not fit this config's model and data sources: "
                                  + " | ".join(problems))


def recorded_tasks(meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """A record's tasks ({name, type, boxes_from}) and outputs per task name. Records from
    before named tasks list task types and outputs per kind of label (thing_classes ...):
    each task was named after its type, the cascades took detection's boxes."""
    tasks, outputs = meta.get("tasks", []), meta.get("outputs", {})
    if not all(isinstance(t, str) for t in tasks):
        return list(tasks), dict(outputs)
    legacy = {"detection": "thing_classes", "instance_mask": "thing_classes", "keypoints": "keypoints",
              "semantic": "semantic_classes", "classification": "image_classes"}
    return ([{"name": t, "type": t, "boxes_from": "detection" if t in CASCADE_TYPES else None} for t in tasks],
            {t: list(outputs.get(legacy.get(t, t), [])) for t in tasks})


def _describe(tasks: list[dict[str, Any]]) -> str:
    return "[" + ", ".join(
        t["name"] if t["name"] == t["type"] and t.get("boxes_from") in (None, "detection") else
        f"{t['name']} ({t['type']}{', boxes from ' + t['boxes_from'] if t.get('boxes_from') else ''})"
        for t in tasks) + "]"
