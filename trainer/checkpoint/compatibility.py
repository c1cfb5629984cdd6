"""Whether a checkpoint's model fits the job: the same tasks, and output indices that mean
the same labels. Shapes alone do not tell: two sources swapped in the config keep every
head's size and swap its classes, and the weights would load and predict the wrong ones."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_pipelines.label_space import LabelSpace, output_differences
from models.config import ModelConfig
from trainer.checkpoint.errors import CheckpointLoadError

log = logging.getLogger(__name__)


def model_record(tasks: list[str], label_space: LabelSpace, model_cfg: ModelConfig) -> dict[str, Any]:
    """What meta.json records of the model's tasks and outputs, and of the settings that
    change what its weights compute (no parameter shape shows them)."""
    return {"tasks": list(tasks), "outputs": label_space.outputs(),
            "fcos_box_activation": model_cfg.fcos_box_activation}


def check_model_record(path: str | Path, meta: dict[str, Any], *, tasks: list[str], label_space: LabelSpace,
                       model_cfg: ModelConfig) -> None:
    """CheckpointLoadError listing every difference between the checkpoint's tasks, outputs
    and box activation (its meta.json) and the job's; an older checkpoint that records no
    tasks and classes has them loaded as before, with a log line."""
    problems = []
    trained = meta.get("fcos_box_activation", "relu")  # before the setting: torchvision's ReLU
    if "detection" in tasks and trained != model_cfg.fcos_box_activation:
        problems.append(f"model.fcos_box_activation: the checkpoint's boxes were trained with {trained!r}, the config "
                        f"has {model_cfg.fcos_box_activation!r}; set model.fcos_box_activation={trained} to use it")
    if "outputs" not in meta:
        log.info("checkpoint %s does not record its tasks and classes (an older polytask); not compared", path)
    elif list(meta.get("tasks", [])) != list(tasks):
        problems.append(f"tasks: the checkpoint has {meta.get('tasks')}, the config (model.tasks) {list(tasks)}")
    if "outputs" in meta:
        problems += output_differences(meta["outputs"], label_space.outputs())
    if problems:
        raise CheckpointLoadError(f"{path}: the checkpoint's model does not fit this config's model and data sources: "
                                  + " | ".join(problems))
