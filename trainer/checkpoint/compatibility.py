"""Whether a checkpoint's model fits the job: the same tasks, and output indices that mean
the same labels. Shapes alone do not tell: two sources swapped in the config keep every
head's size and swap its classes, and the weights would load and predict the wrong ones."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_pipelines.label_space import LabelSpace, output_differences
from trainer.checkpoint.errors import CheckpointLoadError

log = logging.getLogger(__name__)


def model_record(tasks: list[str], label_space: LabelSpace) -> dict[str, Any]:
    """What meta.json records of the model's tasks and outputs."""
    return {"tasks": list(tasks), "outputs": label_space.outputs()}


def check_model_record(path: str | Path, meta: dict[str, Any], *, tasks: list[str], label_space: LabelSpace) -> None:
    """CheckpointLoadError listing every difference between the checkpoint's tasks and
    outputs (its meta.json) and the job's; an older checkpoint that records none is loaded
    as before, with a log line."""
    if "outputs" not in meta:
        log.info("checkpoint %s does not record its tasks and classes (an older polytask); not compared", path)
        return
    problems = []
    if list(meta.get("tasks", [])) != list(tasks):
        problems.append(f"tasks: the checkpoint has {meta.get('tasks')}, the config (model.tasks) {list(tasks)}")
    problems += output_differences(meta["outputs"], label_space.outputs())
    if problems:
        raise CheckpointLoadError(f"{path}: the checkpoint's model does not fit this config's tasks and data sources: "
                                  + " | ".join(problems))
