"""Per-task label spaces merged over sources, and each source's raw-id -> index mapping.

Sources name their classes; classes with the same name in two sources are the same
class. Order is the order of first appearance over the sources as configured, so the
label space is a deterministic function of the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data_pipelines.manifest import KeypointSchema, Manifest


@dataclass
class LabelSpace:
    # Object classes shared by detection and instance masks.
    thing_classes: list[str] = field(default_factory=list)
    semantic_classes: list[str] = field(default_factory=list)
    image_classes: list[str] = field(default_factory=list)
    keypoints: KeypointSchema | None = None
    # source name -> {COCO category id -> index in thing_classes}
    category_to_index: dict[str, dict[int, int]] = field(default_factory=dict)
    # source name -> lookup list: raw semantic pixel value -> index in semantic_classes
    semantic_remap: dict[str, list[int]] = field(default_factory=dict)
    # source name -> lookup list: raw class_id -> index in image_classes
    class_remap: dict[str, list[int]] = field(default_factory=dict)

    def num_classes(self) -> dict[str, int]:
        """Output sizes the model heads need, keyed by task."""
        return {
            "detection": len(self.thing_classes),
            "instance_mask": len(self.thing_classes),
            "keypoints": len(self.keypoints.names) if self.keypoints else 0,
            "semantic": len(self.semantic_classes),
            "classification": len(self.image_classes),
        }


def _merge(names: list[str], into: list[str]) -> list[int]:
    out = []
    for n in names:
        if n not in into:
            into.append(n)
        out.append(into.index(n))
    return out


def build_label_space(manifests: list[Manifest]) -> LabelSpace:
    space = LabelSpace()
    for m in manifests:
        tasks = set(m.tasks)
        if tasks & {"detection", "instance_mask"}:
            ids = [c["id"] for c in m.categories]
            idx = _merge([c["name"] for c in m.categories], space.thing_classes)
            space.category_to_index[m.name] = dict(zip(ids, idx))
        if "keypoints" in tasks:
            assert m.keypoints is not None  # Manifest.validate guarantees it
            if space.keypoints is None:
                space.keypoints = m.keypoints
            elif space.keypoints != m.keypoints:
                raise ValueError(
                    f"source {m.name!r}: keypoint schema (names, skeleton, flip_map, sigmas) differs from "
                    f"an earlier source's {space.keypoints}; one keypoint head needs one schema"
                )
        if "semantic" in tasks:
            space.semantic_remap[m.name] = _merge(m.semantic_classes, space.semantic_classes)
        if "classification" in tasks:
            space.class_remap[m.name] = _merge(m.classes, space.image_classes)
    return space
