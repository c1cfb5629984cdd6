"""``manifest.json``: what a converted source holds. Written last by the converter, so a
source directory without one is incomplete and is never read.

Shard format (ordinary tar files, one sample = members sharing a key)::

    <key>.jpg | <key>.png   the original image bytes, unchanged from the source
    <key>.json              {"image": {COCO image dict: id, file_name, width, height},
                             "annotations": [COCO annotation dicts, unchanged: id, category_id,
                                             bbox (xywh), area, iscrowd, segmentation
                                             (polygons or RLE), keypoints, num_keypoints],
                             "class_id": int | absent (image-level class, classification),
                             "image_labels": {field: int | null} | absent (several named
                                             image-level classes; null: not labelled)}
    <key>.seg.png           semantic mask, one channel, values = semantic class ids,
                            255 = unlabelled (semantic sources only)

Beside the shards, COCO sources hold ``annotations.json``, a copy of the original COCO json
(``annotation_file``), so a source directory is self-contained.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipelines.schema import TASK_TYPES

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = "polytask-shards/1"
SAMPLE_ORDERS = ("shuffled", "original")  # how converters order samples into shards


@dataclass(kw_only=True)
class ShardInfo:
    # Relative to the manifest's directory and inside it. A manifest ships with downloaded
    # data, so it is untrusted: URLs and ``pipe:`` commands come only from the user's config
    # (``SourceConfig.shards``), never from here.
    path: str
    num_samples: int
    num_bytes: int = 0


@dataclass(kw_only=True)
class KeypointSchema:
    names: list[str]
    skeleton: list[list[int]] = field(default_factory=list)  # 1-based pairs, as in COCO
    flip_map: list[list[str]] = field(default_factory=list)  # [left_name, right_name] pairs
    sigmas: list[float] = field(default_factory=list)  # OKS sigmas, one per keypoint

    def flip_permutation(self) -> list[int]:
        """Index permutation that swaps left/right keypoints after a horizontal flip."""
        index = {n: i for i, n in enumerate(self.names)}
        perm = list(range(len(self.names)))
        for left, right in self.flip_map:
            if left not in index or right not in index:
                raise ValueError(f"flip_map pair {[left, right]} names an unknown keypoint; known: {self.names}")
            perm[index[left]], perm[index[right]] = index[right], index[left]
        return perm


@dataclass(kw_only=True)
class Manifest:
    name: str
    tasks: list[str]
    shards: list[ShardInfo]
    # COCO categories [{"id": int, "name": str}] for detection / instance_mask / keypoints.
    categories: list[dict] = field(default_factory=list)
    keypoints: KeypointSchema | None = None
    # Semantic class names; index in this list == pixel value in <key>.seg.png.
    semantic_classes: list[str] = field(default_factory=list)
    # Image-level class names; index == "class_id" in <key>.json.
    classes: list[str] = field(default_factory=list)
    # Several named image-level labels per image (weather, time of day), instead of
    # ``classes``: field -> class names; index == "image_labels"[field] in <key>.json.
    image_labels: dict[str, list[str]] = field(default_factory=dict)
    # The source's COCO ground truth (evaluation scores against the original ids): a copy of
    # the converted json inside the source directory, relative to it (see ``annotation_path``).
    annotation_file: str | None = None
    # The order the converter wrote the samples in: "shuffled" (a seeded permutation,
    # ``order_seed``, so that no shard holds one class of a class-sorted source) or
    # "original" (the input's order); None in manifests written before it was recorded.
    order: str | None = None
    order_seed: int | None = None
    format: str = FORMAT_VERSION
    root: str = ""  # directory the manifest was loaded from; not serialised

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_urls(self) -> list[str]:
        """Shard files: the (validated, relative) paths joined to the manifest's directory."""
        return [os.path.join(self.root, shard.path) for shard in self.shards]

    def annotation_path(self) -> str | None:
        """The ground-truth json: the (validated, relative) ``annotation_file`` joined to the
        manifest's directory, so a source directory can be moved or copied whole."""
        return None if self.annotation_file is None else os.path.join(self.root, self.annotation_file)

    def validate(self, where: str) -> None:
        unknown = sorted(set(self.tasks) - set(TASK_TYPES))
        if unknown:
            raise ValueError(f"{where}: unknown task(s) {unknown}; expected a subset of {list(TASK_TYPES)}")
        if not self.shards:
            raise ValueError(f"{where}: no shards listed")
        for i, shard in enumerate(self.shards):
            problem = unsafe_relative_path(shard.path)
            if problem:
                raise ValueError(
                    f"{where}: shards[{i}].path {shard.path!r} {problem}; a manifest may only name shard "
                    f"files inside its own directory (give URLs or pipe: commands in the config's "
                    f"data.sources[].shards instead)"
                )
        if self.annotation_file is not None:
            _check_annotation_file(self.annotation_file, where)
        if self.order not in (None, *SAMPLE_ORDERS):
            raise ValueError(f"{where}: order {self.order!r} is not one of {list(SAMPLE_ORDERS)}")
        if (self.order == "shuffled") != (isinstance(self.order_seed, int) and not isinstance(self.order_seed, bool)):
            raise ValueError(f"{where}: order_seed {self.order_seed!r} must be an integer with order 'shuffled' only")
        # A task the source's annotations are not of (an ImageFolder source mapped to detection,
        # a COCO one to classification): named with the source and the task.
        if "keypoints" in self.tasks and (self.keypoints is None or not self.keypoints.names):
            raise ValueError(f"{where}: source {self.name!r} labels task 'keypoints' but has no 'keypoints.names'")
        if self.keypoints is not None:
            problem = bad_keypoint_sigmas(self.keypoints.sigmas, len(self.keypoints.names))
            if problem:
                raise ValueError(f"{where}: keypoints.sigmas {problem}")
        if "semantic" in self.tasks and not self.semantic_classes:
            raise ValueError(f"{where}: source {self.name!r} labels task 'semantic' but has no 'semantic_classes'")
        if "classification" in self.tasks and not (self.classes or self.image_labels):
            raise ValueError(f"{where}: source {self.name!r} labels task 'classification' but has no 'classes' "
                             f"or 'image_labels'")
        if self.classes and self.image_labels:
            raise ValueError(f"{where}: source {self.name!r} has both 'classes' and 'image_labels'; one image label "
                             f"is 'classes', several are 'image_labels'")
        for label, classes in self.image_labels.items():
            if not isinstance(label, str) or not label.strip() or "/" in label or label in TASK_TYPES:
                raise ValueError(f"{where}: image_labels field {label!r} must be a name without '/' and not a task "
                                 f"type")
            if not isinstance(classes, list) or not classes:
                raise ValueError(f"{where}: image_labels[{label!r}] must list its class names")
        for task in ("detection", "instance_mask"):
            if task in self.tasks and not self.categories:
                raise ValueError(f"{where}: source {self.name!r} labels task {task!r} but has no 'categories'")

    def label_fields(self) -> dict[str, list[str]]:
        """The source's image-level labels: field -> class names. ``classes`` is the one field
        named "classification"."""
        if "classification" not in self.tasks:
            return {}
        return {k: list(v) for k, v in self.image_labels.items()} or {"classification": list(self.classes)}

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, directory: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written manifest."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)
        return path


def unsafe_relative_path(path: str) -> str | None:
    """Why ``path`` (a shard or the ground truth) may not appear in a manifest, or None when it
    is a plain relative file path that stays inside the manifest's directory (lexically;
    ``load_manifest`` also refuses symlinks that lead out of it)."""
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    if ":" in path.split("/", 1)[0]:  # pipe:..., file:..., s3://..., http://...
        return "is a URL or command"
    if os.path.isabs(path) or path.startswith("~"):
        return "is absolute"
    if ".." in Path(path).parts:
        return "leaves the manifest's directory"
    return None


def _check_annotation_file(path: str, where: str) -> None:
    problem = unsafe_relative_path(path)
    if problem == "is absolute":
        # What converters before self-contained sources wrote: the original json's own path.
        raise ValueError(
            f"{where}: annotation_file {path!r} is absolute; this source was converted by an older polytask "
            f"that did not copy its ground truth into the source directory: re-run `polytask data convert coco`"
        )
    if problem:
        raise ValueError(
            f"{where}: annotation_file {path!r} {problem}; a manifest may only name a ground-truth file "
            f"inside its own directory"
        )


def bad_keypoint_sigmas(sigmas: object, num_keypoints: int) -> str | None:
    """Why ``sigmas`` are not usable OKS sigmas for ``num_keypoints`` keypoints, or None."""
    if not isinstance(sigmas, list | tuple) or len(sigmas) != num_keypoints:
        count = len(sigmas) if isinstance(sigmas, list | tuple) else type(sigmas).__name__
        return f"gives {count} value(s) for {num_keypoints} keypoints; one per keypoint is needed"
    for i, sigma in enumerate(sigmas):
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma <= 0:
            return f"[{i}] is {sigma!r}; each sigma must be a finite number > 0"
    return None


_REQUIRED = ("name", "tasks", "shards")


def load_manifest(directory: str | Path) -> Manifest:
    """Load ``<directory>/manifest.json``; errors name the file and the bad key."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; the source at {directory} is missing or was not fully converted "
            f"(run `polytask data convert` on it)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    if raw.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{path}: format {raw.get('format')!r}, this polytask reads {FORMAT_VERSION!r}")
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        kp = raw.pop("keypoints", None)
        keypoints = KeypointSchema(**kp) if kp else None
        manifest = Manifest(shards=shards, keypoints=keypoints, root=str(Path(directory)), **raw)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    manifest.validate(str(path))
    root = os.path.realpath(directory)
    for i, url in enumerate(manifest.shard_urls()):
        if not _inside(root, url):
            raise ValueError(
                f"{path}: shards[{i}].path {manifest.shards[i].path!r} is a symlink that leads out of "
                f"the source directory; a manifest may only name shard files inside it"
            )
    ground_truth = manifest.annotation_path()
    if ground_truth is not None and not _inside(root, ground_truth):
        raise ValueError(
            f"{path}: annotation_file {manifest.annotation_file!r} is a symlink that leads out of the source "
            f"directory; a manifest may only name a ground-truth file inside it"
        )
    return manifest


def _inside(root: str, path: str) -> bool:
    """Whether ``path``, symlinks resolved, lies in the (resolved) directory ``root``."""
    return os.path.commonpath([root, os.path.realpath(path)]) == root
