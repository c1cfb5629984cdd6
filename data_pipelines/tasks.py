"""Named tasks: what the model learns, each of a type and with a label space of its own, and
which task each source's annotations train.

A task type is a kind of annotation (``TASK_TYPES``). A job configures named tasks
(``model.tasks``): by default one task per annotation type of the training sources, named
after its type; the short form lists types, each task again named after its type
(``[detection, semantic]``); the long form maps names to types, for several tasks of one
type (per-dataset detection heads, several keypoint schemas, several image labels)::

    tasks:
      coco: detection
      driving: detection
      coco_masks: {type: instance_mask, boxes_from: coco}
      weather: classification

Cascade tasks (instance masks, keypoints) predict on the boxes of one detection task,
``boxes_from``; with a single detection task that is the default.

A source feeds at most one task of each type, but classification: its annotation types map
to task names (``data.sources[i].tasks: {detection: driving}``). The default maps a type to
the task named after it, else to the only task of that type; types no task has are not
trained. Several detection, mask, keypoint or semantic tasks therefore come from several
sources, each source's annotations keeping one label space per type (its instances are one
set of boxes, whatever tasks read them). Image labels are the exception: a source may have
several named fields (``Manifest.image_labels``: weather, time of day), each feeding a
classification task of its own, by default the one named after the field.

Torch-free: the CLI validates tasks before anything imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_pipelines.schema import TASK_TYPES

# Heads that pool RoIs: they train on ground-truth boxes but predict on a detection task's boxes.
CASCADE_TYPES: tuple[str, ...] = ("instance_mask", "keypoints")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    boxes_from: str | None = None  # cascade types: the detection task whose boxes they use


def parse_tasks(raw: Any, *, where: str = "model.tasks") -> list[TaskSpec]:
    """``model.tasks`` (a list of types, or a mapping name -> type | {type, boxes_from}) as
    task specs in config order; every problem names the task."""
    if isinstance(raw, (list, tuple)):
        entries: list[tuple[str, Any]] = [(t, t) for t in raw]
        for t in raw:
            if not isinstance(t, str) or t not in TASK_TYPES:
                raise ValueError(f"{where}: {t!r} is not a task type; the list form names types, one of "
                                 f"{list(TASK_TYPES)} (map names to types for named tasks)")
    elif isinstance(raw, dict):
        entries = list(raw.items())
    else:
        raise ValueError(f"{where}: expected a list of task types or a mapping of task names, got {raw!r}")
    if not entries:
        raise ValueError(f"{where}: no tasks; name at least one")
    specs = []
    for name, value in entries:
        if not isinstance(name, str) or not name.strip() or "/" in name or name != name.strip():
            raise ValueError(f"{where}: task name {name!r} must be a non-empty name without '/' or edge spaces "
                             f"(it becomes part of metric keys such as loss/<task>)")
        if isinstance(value, str):
            value = {"type": value}
        if not isinstance(value, dict) or set(value) - {"type", "boxes_from"} or "type" not in value:
            raise ValueError(f"{where}.{name}: expected a task type or {{type: ..., boxes_from: ...}}, got {value!r}")
        if value["type"] not in TASK_TYPES:
            raise ValueError(f"{where}.{name}: unknown type {value['type']!r}; expected one of {list(TASK_TYPES)}")
        specs.append(TaskSpec(name, value["type"], value.get("boxes_from")))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: task name(s) {duplicates} given more than once")
    detections = [s.name for s in specs if s.type == "detection"]
    resolved = []
    for spec in specs:
        if spec.type not in CASCADE_TYPES:
            if spec.boxes_from is not None:
                raise ValueError(f"{where}.{spec.name}: boxes_from is only for {list(CASCADE_TYPES)} tasks, "
                                 f"{spec.name!r} is {spec.type!r}")
            resolved.append(spec)
            continue
        boxes_from = spec.boxes_from
        if boxes_from is None:
            if len(detections) != 1:
                raise ValueError(
                    f"{where}.{spec.name}: a {spec.type} task predicts on a detection task's boxes; "
                    + ("there is none, so add one" if not detections else
                       f"there are {detections}, so give boxes_from")
                )
            boxes_from = detections[0]
        elif boxes_from not in detections:
            raise ValueError(f"{where}.{spec.name}: boxes_from {boxes_from!r} is not a detection task; "
                             f"detection tasks: {detections}")
        resolved.append(TaskSpec(spec.name, spec.type, boxes_from))
    return resolved


def source_task_names(source: str, annotation_types: list[str], tasks: list[TaskSpec],
                      explicit: dict[str, str] | None, *, where: str,
                      label_fields: list[str] | None = None) -> dict[str, str]:
    """Annotation -> task name for one source. Its annotations are its manifest's types
    (``tasks``), classification standing for its image-label fields (``label_fields``;
    ``classes`` is the field "classification"). ``explicit`` (``data.sources[i].tasks``)
    where given, else the task named after the annotation, else the only task of its type
    (for a field: when the source has one); one of no task's type is left out. Errors name
    the source and the task."""
    by_name = {t.name: t for t in tasks}
    fields = list(label_fields if label_fields is not None else ["classification"]) \
        if "classification" in annotation_types else []
    kinds = {t: t for t in annotation_types if t != "classification"} | {f: "classification" for f in fields}
    out: dict[str, str] = {}
    for annotation, task_name in (explicit or {}).items():
        if annotation not in kinds:
            if annotation in TASK_TYPES:
                raise ValueError(f"{where}.tasks: source {source!r} has no {annotation!r} annotations "
                                 f"(its manifest labels {annotation_types})")
            raise ValueError(f"{where}.tasks: {annotation!r} is not an annotation type or image-label field of "
                             f"source {source!r}; it has {list(kinds)}")
        task = by_name.get(task_name)
        if task is None:
            raise ValueError(f"{where}.tasks: source {source!r} maps {annotation!r} to task {task_name!r}, "
                             f"which model.tasks does not name; tasks: {list(by_name)}")
        if task.type != kinds[annotation]:
            raise ValueError(f"{where}.tasks: source {source!r} maps its {annotation!r} annotations to task "
                             f"{task_name!r}, which is a {task.type!r} task")
        out[annotation] = task_name
    for annotation, kind in kinds.items():
        if annotation in out:
            continue
        named = by_name.get(annotation)
        of_type = [t.name for t in tasks if t.type == kind]
        if named is not None and named.type == kind:
            out[annotation] = named.name
        elif len(of_type) == 1 and (kind != "classification" or len(fields) == 1):
            out[annotation] = of_type[0]
        elif of_type:
            what = f"image label {annotation!r}" if annotation != kind else f"{kind!r} annotations"
            raise ValueError(f"{where}.tasks: source {source!r} has {what} and there are several {kind} tasks "
                             f"{of_type}; map it to one, e.g. {{{annotation}: {of_type[0]}}}")
    fed = list(out.values())
    twice = sorted({n for n in fed if fed.count(n) > 1})
    if twice:
        raise ValueError(f"{where}.tasks: source {source!r} feeds task(s) {twice} from more than one annotation; "
                         f"a task takes one label per image")
    # A source's instances are one set of boxes and classes: its masks and keypoints train
    # on them, so its cascade tasks must take boxes from the detection task it feeds.
    detection = out.get("detection")
    for cascade in CASCADE_TYPES:
        task = by_name.get(out.get(cascade, ""))
        if task is not None and detection is not None and task.boxes_from != detection:
            raise ValueError(f"{where}.tasks: source {source!r} feeds detection task {detection!r} but {cascade} "
                             f"task {task.name!r}, which takes its boxes from {task.boxes_from!r}; map them to "
                             f"tasks that share boxes")
    order = [*(t for t in TASK_TYPES if t != "classification"), *fields]
    return {a: out[a] for a in sorted(out, key=order.index)}


def derived_tasks(sources: list[tuple[list[str], list[str]]]) -> list[TaskSpec]:
    """The default tasks, from each source's (annotation types, image-label fields): one per
    annotation type the sources have, named after it, and one per image-label field
    (classification; ``classes`` is the field "classification"). The cascades take the
    detection task's boxes (none without one: :func:`check_cascades` refuses such tasks for
    a model, the data alone can still be read)."""
    present = [t for t in TASK_TYPES if any(t in types for types, _ in sources)]
    boxes = "detection" if "detection" in present else None
    fields = dict.fromkeys(f for types, labels in sources if "classification" in types for f in labels)
    return [TaskSpec(t, t, boxes if t in CASCADE_TYPES else None) for t in present if t != "classification"] + [
        TaskSpec(f, "classification") for f in fields]


def check_cascades(tasks: list[TaskSpec]) -> None:
    """ValueError naming a cascade task without a detection task to take boxes from."""
    for task in tasks:
        if task.type in CASCADE_TYPES and task.boxes_from is None:
            raise ValueError(f"model.tasks: the {task.type} task {task.name!r} predicts on a detection task's boxes, "
                             f"and no training source labels detection; add one, or set model.tasks without it")
