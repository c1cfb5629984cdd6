"""Validation sources: their manifests, bound to the model's tasks as training sources are
and mapped into the tasks' training label spaces by class name.

The model's outputs index the label space built from the training sources. A validation
source is another directory (possibly another source name) with the same classes; its ids
are mapped into that space by name, as ``build_label_space`` merges sources.
"""
from __future__ import annotations

from data_pipelines.label_space import LabelSpace, keypoint_remap, restrict_to_tasks
from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.streaming.config import SourceConfig
from data_pipelines.tasks import source_task_names
from trainer.evaluation.config import EvalConfig


def load_eval_manifests(cfg: EvalConfig) -> list[Manifest]:
    """The validation manifests in config order."""
    manifests = []
    for i, source in enumerate(cfg.sources):
        try:
            manifests.append(load_manifest(source.path))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"eval.sources[{i}].path: {e}") from e
    names = [m.name for m in manifests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Results files, metric keys and image ids are per source name.
        raise ValueError(f"eval.sources: source name(s) {duplicates} appear more than once")
    return manifests


def map_eval_sources(train: LabelSpace, manifests: list[Manifest],
                     sources: list[SourceConfig]) -> tuple[LabelSpace, list[Manifest]]:
    """``train``'s tasks and classes, with each of ``manifests`` bound to the tasks as a
    training source is (``sources[i].tasks``, else derived) and mapped into their classes by
    name; and the manifests with only the annotation types a task predicts (the rest
    cannot be evaluated).

    Raises ValueError naming the source and the classes the model never learned.
    """
    space = LabelSpace(tasks=train.tasks, classes=train.classes, keypoint_schemas=train.keypoint_schemas)
    for i, (m, source) in enumerate(zip(manifests, sources)):
        fed = source_task_names(m.name, list(m.tasks), train.tasks, source.tasks, where=f"eval.sources[{i}]",
                                label_fields=list(m.label_fields()))
        space.source_tasks[m.name] = fed
        thing_task = space.thing_task(m.name)
        if thing_task is not None:
            indices = _indices(m, [c["name"] for c in m.categories], train.classes[thing_task], "categories", thing_task)
            space.category_to_index[m.name] = dict(zip((c["id"] for c in m.categories), indices))
        if "semantic" in fed:
            space.semantic_remap[m.name] = _indices(m, m.semantic_classes, train.classes[fed["semantic"]],
                                                    "semantic_classes", fed["semantic"])
        fields = m.label_fields()
        for label, task in space.label_tasks(m.name).items():
            what = "classes" if m.classes else f"image_labels[{label!r}]"
            space.class_remap.setdefault(m.name, {})[label] = _indices(m, fields[label], train.classes[task], what, task)
        if "keypoints" in fed:
            assert m.keypoints is not None  # Manifest.validate guarantees it
            task = fed["keypoints"]
            # Scored on its own keypoints, picked by name from the task's unified ones.
            space.keypoint_remap[m.name] = keypoint_remap(m.keypoints, train.keypoint_schemas[task],
                                                          source=f"validation source {m.name!r}", task=task)
    return space, restrict_to_tasks(manifests, space)


def _indices(manifest: Manifest, names: list[str], known: list[str], what: str, task: str) -> list[int]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"validation source {manifest.name!r}, task {task!r}: {what} {unknown} are not in the task's training "
            f"label space {known}"
        )
    return [known.index(n) for n in names]
