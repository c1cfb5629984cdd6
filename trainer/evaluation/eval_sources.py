"""Validation sources: their manifests, restricted to the model's tasks and mapped into the
training label space by class name.

The model's outputs index the label space built from the training sources. A validation
source is another directory (possibly another source name) with the same classes; its ids
are mapped into that space by name, as ``build_label_space`` merges sources.
"""
from __future__ import annotations

import dataclasses

from data_pipelines.label_space import LabelSpace, keypoint_remap
from data_pipelines.manifest import Manifest, load_manifest
from trainer.evaluation.config import EvalConfig


def load_eval_manifests(cfg: EvalConfig, *, model_tasks: list[str]) -> list[Manifest]:
    """The validation manifests in config order, each with only the tasks the model predicts."""
    manifests = []
    for i, source in enumerate(cfg.sources):
        try:
            manifest = load_manifest(source.path)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"eval.sources[{i}].path: {e}") from e
        manifests.append(_restrict_tasks(manifest, model_tasks))
    names = [m.name for m in manifests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Results files, metric keys and image ids are per source name.
        raise ValueError(f"eval.sources: source name(s) {duplicates} appear more than once")
    return manifests


def _restrict_tasks(manifest: Manifest, model_tasks: list[str]) -> Manifest:
    """The manifest with only the tasks the model predicts: the rest cannot be evaluated."""
    return dataclasses.replace(manifest, tasks=[t for t in manifest.tasks if t in model_tasks])


def map_eval_sources(train: LabelSpace, manifests: list[Manifest]) -> LabelSpace:
    """``train``'s classes, with each of ``manifests`` mapped into them by name.

    Raises ValueError naming the source and the classes the model never learned.
    """
    space = LabelSpace(
        thing_classes=train.thing_classes,
        semantic_classes=train.semantic_classes,
        image_classes=train.image_classes,
        keypoints=train.keypoints,
    )
    for m in manifests:
        tasks = set(m.tasks)
        if tasks & {"detection", "instance_mask"}:
            indices = _indices(m, [c["name"] for c in m.categories], train.thing_classes, "categories")
            space.category_to_index[m.name] = dict(zip((c["id"] for c in m.categories), indices))
        if "semantic" in tasks:
            space.semantic_remap[m.name] = _indices(m, m.semantic_classes, train.semantic_classes, "semantic_classes")
        if "classification" in tasks:
            space.class_remap[m.name] = _indices(m, m.classes, train.image_classes, "classes")
        if "keypoints" in tasks:
            assert m.keypoints is not None  # Manifest.validate guarantees it
            if train.keypoints is None:
                raise ValueError(f"validation source {m.name!r}: labels keypoints, which no training source does")
            # Scored on its own keypoints, picked by name from the model's unified ones.
            space.keypoint_remap[m.name] = keypoint_remap(m.keypoints, train.keypoints,
                                                       source=f"validation source {m.name!r}")
    return space


def _indices(manifest: Manifest, names: list[str], known: list[str], what: str) -> list[int]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"validation source {manifest.name!r}: {what} {unknown} are not in the training label space {known}"
        )
    return [known.index(n) for n in names]
