"""Per-task label spaces merged over the sources feeding each task (``data_pipelines/tasks.py``),
each source's raw-id -> index mapping, and what each source covers of them.

Sources name their classes; classes with the same name in two sources feeding one task
are the same class. Order is the order of first appearance over the sources as configured,
so the label space is a deterministic function of the config.

Coverage (invariant 7 of the design): a source annotates only its own classes and
keypoints; the others may be in its images unlabelled, so its samples must not train
them as negatives. :meth:`LabelSpace.covered` says which label-space indices a source
annotates per task; the per-sample coverage vectors the losses read come from
:meth:`LabelSpace.sample_coverage`.

Keypoints merge by name: a keypoint task's unified schema is the largest schema among the
sources feeding it (the first in config order on a tie), and every other source feeding it
must name a subset of it; its keypoints are put at their unified indices and the rest are
"not labelled" (visibility 0), which no keypoint loss trains on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from data_pipelines.manifest import KeypointSchema, Manifest
from data_pipelines.schema import COVERAGE_KEYS, class_coverage_key, task_mask_for
from data_pipelines.tasks import TaskSpec, derived_tasks, source_task_names

# Task types whose classes are a detection task's thing classes (instance masks share those
# of the detection task they take boxes from).
THING_TYPES: tuple[str, ...] = ("detection", "instance_mask")


@dataclass
class LabelSpace:
    tasks: list[TaskSpec] = field(default_factory=list)
    # task name -> its output names by index: classes (detection, semantic, classification;
    # an instance_mask task has its boxes_from task's), keypoint names (keypoints)
    classes: dict[str, list[str]] = field(default_factory=dict)
    # keypoint task name -> its unified schema
    keypoint_schemas: dict[str, KeypointSchema] = field(default_factory=dict)
    # source name -> annotation (a type, or an image-label field) -> the task it trains
    # (data_pipelines/tasks.py)
    source_tasks: dict[str, dict[str, str]] = field(default_factory=dict)
    # Each source feeds one task per type but classification (one per image-label field),
    # so its mappings below index that task's space.
    # source name -> {COCO category id -> index in its detection task's classes}
    category_to_index: dict[str, dict[int, int]] = field(default_factory=dict)
    # source name -> lookup list: raw semantic pixel value -> class index
    semantic_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> image-label field -> lookup list: raw class id -> class index
    class_remap: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # source name -> the unified index of each of the source's keypoints (its own order)
    keypoint_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> per-sample coverage targets (see sample_coverage); built on first use
    _coverage_cache: dict[str, dict[str, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _task_masks: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def task_of(self, source: str, task_type: str) -> str | None:
        """The task ``source``'s annotations of ``task_type`` train, if any (not for
        classification, which has one per image-label field: :meth:`label_tasks`)."""
        assert task_type != "classification", "classification: label_tasks()"
        return self.source_tasks.get(source, {}).get(task_type)

    def fed_tasks(self, source: str) -> list[str]:
        """The tasks ``source``'s annotations train."""
        return list(self.source_tasks.get(source, {}).values())

    def thing_task(self, source: str) -> str | None:
        """The detection task whose classes ``source``'s instance labels index: the one it
        feeds, else the one its instance-mask task takes boxes from; None without any."""
        fed = self.source_tasks.get(source, {})
        if "detection" in fed:
            return fed["detection"]
        return self.task(fed["instance_mask"]).boxes_from if "instance_mask" in fed else None

    def label_tasks(self, source: str) -> dict[str, str]:
        """Image-label field -> the classification task it trains, for ``source``."""
        return {a: t for a, t in self.source_tasks.get(source, {}).items() if self.task(t).type == "classification"}

    def keypoint_schema_of(self, source: str) -> KeypointSchema | None:
        """The unified schema of the keypoint task ``source`` feeds (its flip pairs)."""
        task = self.task_of(source, "keypoints")
        return None if task is None else self.keypoint_schemas[task]

    def num_classes(self) -> dict[str, int]:
        """Output sizes the model heads need, keyed by task name."""
        return {t.name: len(self.classes[t.name]) for t in self.tasks}

    def outputs(self) -> dict[str, list[str]]:
        """What the model's output indices mean, per task: the names in index order.
        A checkpoint records it (meta.json); a model is only loaded where it is the same."""
        return {t.name: list(self.classes[t.name]) for t in self.tasks}

    def covered(self, source: str, task: str) -> list[int] | None:
        """Sorted output indices (keypoint indices for a keypoint task) that ``source``
        annotates for task ``task``; None when the source does not feed the task."""
        task_type = self.task(task).type
        annotation = next((a for a, t in self.source_tasks.get(source, {}).items() if t == task), None)
        if annotation is None:
            return None
        if task_type in THING_TYPES:
            mapping = self.category_to_index.get(source)
            return None if mapping is None else sorted(set(mapping.values()))
        if task_type == "classification":
            return sorted(set(self.class_remap[source][annotation]))
        remap = {"semantic": self.semantic_remap, "keypoints": self.keypoint_remap}[task_type].get(source)
        return None if remap is None else sorted(set(remap))

    def sample_coverage(self, source: str) -> dict[str, torch.Tensor]:
        """Target key -> bool [C] of the classes ``source`` annotates, only for the tasks it
        covers in part: an absent key means "every class" (no masking, nothing to carry).
        Built once per source and shared read-only (collate copies)."""
        cached = self._coverage_cache.get(source)
        if cached is None:
            keyed = [(key, self.task_of(source, task_type)) for task_type, key in COVERAGE_KEYS.items()]
            keyed += [(class_coverage_key(task), task) for task in self.label_tasks(source).values()]
            cached = {}
            for key, task in keyed:
                indices = None if task is None else self.covered(source, task)
                size = 0 if task is None else len(self.classes[task])
                if indices is not None and len(indices) < size:
                    mask = torch.zeros(size, dtype=torch.bool)
                    mask[indices] = True
                    cached[key] = mask
            self._coverage_cache[source] = cached
        return cached

    def task_mask(self, source: str) -> torch.Tensor:
        """bool [T]: the tasks ``source`` feeds, over the job's tasks. Built once per source,
        not per sample (it costs as much as a small resize); shared read-only: collate
        stacks copies."""
        mask = self._task_masks.get(source)
        if mask is None:
            mask = task_mask_for(self.fed_tasks(source), self.task_names)
            self._task_masks[source] = mask
        return mask

    def coverage_table(self, manifests: list[Manifest]) -> dict[str, dict[str, str]]:
        """source -> task -> "covered/label-space size", for the tasks each source feeds
        (the start-up log and the run's config.yaml show it)."""
        sizes = self.num_classes()
        table = {}
        for m in manifests:
            row = {}
            for task in self.fed_tasks(m.name):
                indices = self.covered(m.name, task)
                if indices is not None:
                    row[task] = f"{len(indices)}/{sizes[task]}"
            table[m.name] = row
        return table


def _merge(names: list[str], into: list[str]) -> list[int]:
    out = []
    for n in names:
        if n not in into:
            into.append(n)
        out.append(into.index(n))
    return out


def _normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _check_names(source: str, task: str, names: list[str], merged: list[str], what: str) -> None:
    """Class names that would merge wrongly: a name twice in one source (two ids, one class),
    or a name that differs from another class's only in case, spaces or underscores (two
    classes where one was surely meant)."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"source {source!r}, task {task!r}: {what} has an empty or non-text name {name!r}")
        if name in seen.values():
            raise ValueError(
                f"source {source!r}, task {task!r}: {what} names {name!r} twice; each class needs its own name"
            )
        key = _normalised(name)
        if key in seen:
            raise ValueError(
                f"source {source!r}, task {task!r}: {what} {seen[key]!r} and {name!r} differ only in case, spaces "
                f"or underscores; rename one so they are one class or clearly two"
            )
        seen[key] = name
    for name in names:
        clash = next((m for m in merged if m != name and _normalised(m) == _normalised(name)), None)
        if clash is not None:
            raise ValueError(
                f"source {source!r}, task {task!r}: {what} {name!r} differs from the class {clash!r} of an earlier "
                f"source only in case, spaces or underscores; rename one so they merge (same name) or differ clearly"
            )


def _unified_keypoints(manifests: list[Manifest], source_tasks: dict[str, dict[str, str]],
                       task: str) -> KeypointSchema | None:
    """The largest keypoint schema among the sources feeding keypoint task ``task`` (first
    in config order on a tie)."""
    schemas = [m.keypoints for m in manifests
               if source_tasks[m.name].get("keypoints") == task and m.keypoints is not None]
    return max(schemas, key=lambda s: len(s.names)) if schemas else None


def keypoint_remap(schema: KeypointSchema, unified: KeypointSchema, *, source: str, task: str) -> list[int]:
    """Unified index of each of ``schema``'s keypoints, after checking that ``schema`` is a
    named subset of ``unified`` whose left/right pairs agree with it (a horizontal flip
    permutes keypoints by the unified pairs, so a source must mean the same by them).
    ``source`` and ``task`` name them in errors ("source 'x'")."""
    where = f"{source}: keypoint schema of task {task!r}"
    duplicates = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where} names {duplicates} more than once")
    missing = [n for n in schema.names if n not in unified.names]
    if missing:
        raise ValueError(
            f"{where}: keypoint name(s) {missing} are not in the unified schema {unified.names} (the largest source "
            f"schema of the task); a keypoint source must name a subset of it"
        )
    pairs = {frozenset(p) for p in unified.flip_map}
    own = {frozenset(p) for p in schema.flip_map}
    names = set(schema.names)
    for pair in sorted(own - pairs, key=sorted):
        raise ValueError(f"{where}: flip pair {sorted(pair)} is not a flip pair of the unified schema "
                         f"(its pairs: {unified.flip_map})")
    for pair in sorted(pairs - own, key=sorted):
        if pair <= names:
            raise ValueError(f"{where}: lacks the unified schema's flip pair {sorted(pair)} although it has both "
                             f"keypoints; a horizontal flip swaps them")
    return [unified.names.index(n) for n in schema.names]


def build_label_space(manifests: list[Manifest], tasks: list[TaskSpec] | None = None,
                      source_tasks: list[dict[str, str] | None] | None = None, *,
                      where: str = "data.sources") -> LabelSpace:
    """Each task's label space, merged over the sources feeding it. ``tasks``: the job's
    (``model.tasks``), None = one per annotation type of ``manifests``; ``source_tasks``:
    each manifest's explicit type -> task mapping (``data.sources[i].tasks``), None =
    derived. Every problem names the source and the task."""
    if tasks is None:
        tasks = derived_tasks([(list(m.tasks), list(m.label_fields())) for m in manifests])
    explicit = source_tasks if source_tasks is not None else [None] * len(manifests)
    space = LabelSpace(tasks=list(tasks), classes={t.name: [] for t in tasks})
    for i, (m, mapping) in enumerate(zip(manifests, explicit)):
        space.source_tasks[m.name] = source_task_names(m.name, list(m.tasks), tasks, mapping, where=f"{where}[{i}]",
                                                       label_fields=list(m.label_fields()))
    for t in tasks:
        if t.type == "keypoints":
            schema = _unified_keypoints(manifests, space.source_tasks, t.name)
            if schema is not None:
                space.keypoint_schemas[t.name] = schema
                space.classes[t.name] = list(schema.names)
    for m in manifests:
        fed = space.source_tasks[m.name]
        thing_task = space.thing_task(m.name)
        if thing_task is not None:
            names = [c["name"] for c in m.categories]
            label = fed.get("detection") or fed["instance_mask"]
            _check_names(m.name, label, names, space.classes[thing_task], "categories")
            ids = [c["id"] for c in m.categories]
            space.category_to_index[m.name] = dict(zip(ids, _merge(names, space.classes[thing_task])))
        if "keypoints" in fed:
            assert m.keypoints is not None  # Manifest.validate guarantees it
            task = fed["keypoints"]
            space.keypoint_remap[m.name] = keypoint_remap(m.keypoints, space.keypoint_schemas[task],
                                                          source=f"source {m.name!r}", task=task)
        if "semantic" in fed:
            task = fed["semantic"]
            _check_names(m.name, task, m.semantic_classes, space.classes[task], "semantic_classes")
            space.semantic_remap[m.name] = _merge(m.semantic_classes, space.classes[task])
        fields = m.label_fields()
        for label, task in space.label_tasks(m.name).items():
            what = "classes" if m.classes else f"image_labels[{label!r}]"
            _check_names(m.name, task, fields[label], space.classes[task], what)
            space.class_remap.setdefault(m.name, {})[label] = _merge(fields[label], space.classes[task])
    for t in tasks:  # an instance_mask task outputs its detection task's classes
        if t.type == "instance_mask":
            space.classes[t.name] = space.classes[t.boxes_from]
    unfed = [t.name for t in tasks if not space.classes[t.name]]
    if unfed:
        raise ValueError(f"model.tasks: no source in {where} feeds task(s) {unfed} (or labels a class of them); "
                         f"remove them or add a source that annotates them")
    return space


def restrict_to_tasks(manifests: list[Manifest], space: LabelSpace) -> list[Manifest]:
    """The manifests with only the annotation types a task trains: the rest are not decoded."""
    return [dataclasses.replace(m, tasks=[t for t in m.tasks if t in space.source_tasks[m.name]
                                          or (t == "classification" and space.label_tasks(m.name))])
            for m in manifests]


def output_differences(saved: dict[str, list[str]], current: dict[str, list[str]]) -> list[str]:
    """One line per task whose output names differ between a checkpoint's
    :meth:`LabelSpace.outputs` (``saved``) and the config's (``current``): what is missing,
    what is new, or that the order differs (same names, other indices: the weights would
    load and predict the wrong classes)."""
    lines = []
    for kind in sorted(set(saved) | set(current)):
        old, new = saved.get(kind, []), current.get(kind, [])
        if old == new:
            continue
        missing, added = [n for n in old if n not in new], [n for n in new if n not in old]
        if missing or added:
            parts = ([f"only in the checkpoint {missing}"] if missing else []) + ([f"only in the config {added}"] if added else [])
            lines.append(f"{kind}: " + "; ".join(parts))
        else:
            first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
            lines.append(f"{kind}: the same names in another order (index {first}: checkpoint {old[first]!r}, "
                         f"config {new[first]!r}); sources in another order in the config merge their classes so")
    return lines


def coverage_lines(table: dict[str, dict[str, str]]) -> list[str]:
    """``LabelSpace.coverage_table`` as one line per source: "name: task covered/size, ..."."""
    width = max((len(name) for name in table), default=0)
    return [
        f"{name:<{width}}  " + ", ".join(f"{task} {covered}" for task, covered in row.items())
        for name, row in table.items()
    ]
