"""Per-task label spaces merged over sources, each source's raw-id -> index mapping, and
what each source covers of them.

Sources name their classes; classes with the same name in two sources are the same
class. Order is the order of first appearance over the sources as configured, so the
label space is a deterministic function of the config.

Coverage (invariant 7 of the design): a source annotates only its own classes and
keypoints; the others may be in its images unlabelled, so its samples must not train
them as negatives. :meth:`LabelSpace.covered` says which label-space indices a source
annotates per task; the per-sample coverage vectors the losses read come from
:meth:`LabelSpace.sample_coverage`.

Keypoints merge by name: the unified schema is the largest source schema (the first in
config order on a tie), and every other keypoint source must name a subset of it; its
keypoints are put at their unified indices and the rest are "not labelled" (visibility 0),
which no keypoint loss trains on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_pipelines.manifest import KeypointSchema, Manifest
from data_pipelines.schema import COVERAGE_KEYS

# Tasks whose classes are the shared thing classes.
THING_TASKS: tuple[str, ...] = ("detection", "instance_mask")


@dataclass
class LabelSpace:
    # Object classes shared by detection and instance masks.
    thing_classes: list[str] = field(default_factory=list)
    semantic_classes: list[str] = field(default_factory=list)
    image_classes: list[str] = field(default_factory=list)
    keypoints: KeypointSchema | None = None  # the unified schema
    # source name -> {COCO category id -> index in thing_classes}
    category_to_index: dict[str, dict[int, int]] = field(default_factory=dict)
    # source name -> lookup list: raw semantic pixel value -> index in semantic_classes
    semantic_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> lookup list: raw class_id -> index in image_classes
    class_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> the unified index of each of the source's keypoints (its own order)
    keypoint_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> per-sample coverage targets (see sample_coverage); built on first use
    _coverage_cache: dict[str, dict[str, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def num_classes(self) -> dict[str, int]:
        """Output sizes the model heads need, keyed by task."""
        return {
            "detection": len(self.thing_classes),
            "instance_mask": len(self.thing_classes),
            "keypoints": len(self.keypoints.names) if self.keypoints else 0,
            "semantic": len(self.semantic_classes),
            "classification": len(self.image_classes),
        }

    def outputs(self) -> dict[str, list[str]]:
        """What the model's output indices mean, per kind of label: the names in index order.
        A checkpoint records it (meta.json); a model is only loaded where it is the same."""
        return {"thing_classes": list(self.thing_classes), "semantic_classes": list(self.semantic_classes),
                "image_classes": list(self.image_classes),
                "keypoints": list(self.keypoints.names) if self.keypoints else []}

    def covered(self, source: str, task: str) -> list[int] | None:
        """Sorted label-space indices (keypoint indices for ``keypoints``) that ``source``
        annotates for ``task``; None when the source does not label the task."""
        if task in THING_TASKS:
            mapping = self.category_to_index.get(source)
            return None if mapping is None else sorted(set(mapping.values()))
        remap = {"semantic": self.semantic_remap, "classification": self.class_remap,
                 "keypoints": self.keypoint_remap}[task].get(source)
        return None if remap is None else sorted(set(remap))

    def sample_coverage(self, source: str) -> dict[str, torch.Tensor]:
        """Target key -> bool [C] of the classes ``source`` annotates, only for the tasks it
        covers in part: an absent key means "every class" (no masking, nothing to carry).
        Built once per source and shared read-only (collate copies)."""
        cached = self._coverage_cache.get(source)
        if cached is None:
            sizes = self.num_classes()
            cached = {}
            for task, key in COVERAGE_KEYS.items():
                indices = self.covered(source, task)
                if indices is not None and len(indices) < sizes[task]:
                    mask = torch.zeros(sizes[task], dtype=torch.bool)
                    mask[indices] = True
                    cached[key] = mask
            self._coverage_cache[source] = cached
        return cached

    def coverage_table(self, manifests: list[Manifest]) -> dict[str, dict[str, str]]:
        """source -> task -> "covered/label-space size", for the tasks each source labels
        (the start-up log and the run's config.yaml show it)."""
        sizes = self.num_classes()
        table = {}
        for m in manifests:
            row = {}
            for task in m.tasks:
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


def _unified_keypoints(manifests: list[Manifest]) -> KeypointSchema | None:
    """The largest keypoint schema among the sources (first in config order on a tie)."""
    schemas = [m.keypoints for m in manifests if "keypoints" in m.tasks and m.keypoints is not None]
    return max(schemas, key=lambda s: len(s.names)) if schemas else None


def keypoint_remap(schema: KeypointSchema, unified: KeypointSchema, *, source: str) -> list[int]:
    """Unified index of each of ``schema``'s keypoints, after checking that ``schema`` is a
    named subset of ``unified`` whose left/right pairs agree with it (a horizontal flip
    permutes keypoints by the unified pairs, so a source must mean the same by them).
    ``source`` names it in errors ("source 'x'")."""
    where = f"{source}: keypoint schema of task 'keypoints'"
    duplicates = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where} names {duplicates} more than once")
    missing = [n for n in schema.names if n not in unified.names]
    if missing:
        raise ValueError(
            f"{where}: keypoint name(s) {missing} are not in the unified schema {unified.names} (the largest source "
            f"schema); a keypoint source must name a subset of it"
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


def build_label_space(manifests: list[Manifest]) -> LabelSpace:
    """Merge the sources' label spaces; every problem names the source and the task."""
    space = LabelSpace(keypoints=_unified_keypoints(manifests))
    for m in manifests:
        tasks = set(m.tasks)
        if tasks & set(THING_TASKS):
            names = [c["name"] for c in m.categories]
            task = next(t for t in THING_TASKS if t in tasks)
            _check_names(m.name, task, names, space.thing_classes, "categories")
            ids = [c["id"] for c in m.categories]
            space.category_to_index[m.name] = dict(zip(ids, _merge(names, space.thing_classes)))
        if "keypoints" in tasks:
            assert m.keypoints is not None and space.keypoints is not None  # Manifest.validate guarantees it
            space.keypoint_remap[m.name] = keypoint_remap(m.keypoints, space.keypoints, source=f"source {m.name!r}")
        if "semantic" in tasks:
            _check_names(m.name, "semantic", m.semantic_classes, space.semantic_classes, "semantic_classes")
            space.semantic_remap[m.name] = _merge(m.semantic_classes, space.semantic_classes)
        if "classification" in tasks:
            _check_names(m.name, "classification", m.classes, space.image_classes, "classes")
            space.class_remap[m.name] = _merge(m.classes, space.image_classes)
    return space


def output_differences(saved: dict[str, list[str]], current: dict[str, list[str]]) -> list[str]:
    """One line per kind of label whose names differ between a checkpoint's
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
