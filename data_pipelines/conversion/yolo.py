"""Ultralytics YOLO txt labels + ``data.yaml`` -> shards (see :mod:`data_pipelines.conversion`).

The format, as Ultralytics reads it: ``data.yaml`` names the classes (``names``), the
keypoint layout of pose sets (``kpt_shape: [K, 2 | 3]``, ``flip_idx``) and, per split, the
images (a directory, a ``.txt`` list of image paths, or a list of either, relative to the
dataset root ``path``). The labels of ``.../images/.../x.jpg`` are in
``.../labels/.../x.txt`` (no file: an image without objects), one object per line, every
coordinate normalised to [0, 1] by the image's width and height:

    detection   class cx cy w h
    segment     class x1 y1 x2 y2 ... (a polygon of at least 3 points; its box is its extent)
    pose        class cx cy w h  px1 py1 [v1]  ...  (K keypoints of 2 or 3 values)

Each image becomes one sample whose ``<key>.json`` holds COCO-style annotations in absolute
pixels (box xywh, polygon, keypoints with COCO visibilities), exactly what the COCO
converter writes; the same annotations, as one COCO json, are the source's
``annotations.json`` that evaluation scores against. Category ids are the YOLO class ids.

The dataset directory is ``data.yaml``'s own directory: ``path`` and the split's paths
must stay inside it (a downloaded ``data.yaml`` must not make the converter copy other
files into shards), unless the user names the dataset root with ``root``.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

from data_pipelines.annotation_check import KEYPOINT_VISIBILITIES, check_annotation
from data_pipelines.bad_data import BadRecords
from data_pipelines.conversion.coco import (
    COCO_PERSON_KEYPOINTS,
    COCO_TASKS,
    DEFAULT_KEYPOINT_SIGMA,
    GROUND_TRUTH_NAME,
    resolve_keypoint_sigmas,
)
from data_pipelines.conversion.images import inspect_image, require_dir
from data_pipelines.conversion.shard_writer import (
    DEFAULT_BAD_SAMPLE_POLICY,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_ORDER,
    DEFAULT_ORDER_SEED,
    DEFAULT_SHARD_MAX_BYTES,
    DEFAULT_SHARD_MAX_SAMPLES,
    DEFAULT_WORKERS,
    Sample,
    caught,
    json_bytes,
    parallel_map,
    sample_key,
    write_source,
)
from data_pipelines.manifest import KeypointSchema, Manifest

log = logging.getLogger(__name__)

YOLO_TASKS = COCO_TASKS
# Image suffixes Ultralytics reads; all are listed, so that a BMP or WebP in a split is a
# bad record naming its format (shards hold JPEG and PNG) instead of silently missing.
YOLO_IMAGE_SUFFIXES = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic")
# The flip_idx of COCO's 17 person keypoints in COCO's order (Ultralytics' coco-pose.yaml).
COCO_PERSON_FLIP_IDX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
# COCO scores keypoints with OKS scaled by the person's segment area; YOLO pose labels have
# none, and Ultralytics uses box area x 0.53 in its place (ultralytics/utils/metrics.py).
POSE_AREA_PER_BOX_AREA = 0.53
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class YoloLayout:
    """What ``data.yaml`` says about the labels: class id -> name, and for pose sets the
    keypoint count ``num_keypoints`` and values per keypoint ``keypoint_dims`` (2 or 3)."""

    names: dict[int, str]
    num_keypoints: int | None = None
    keypoint_dims: int | None = None


def convert_yolo(
    data_yaml: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    split: str,
    tasks: Sequence[str],
    root: str | Path | None = None,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
    keypoint_sigmas: Sequence[float] | None = None,
) -> Manifest:
    """Convert one split of an Ultralytics YOLO dataset (detect, segment or pose).

    Keypoint names: ``data.yaml``'s ``kpt_names`` if given, COCO's person keypoints when
    there are 17 with COCO's ``flip_idx``, else ``kpt_0`` ... ; the flip pairs come from
    ``flip_idx``. OKS sigmas as in :func:`convert_coco`. With ``kpt_shape [K, 2]`` a
    keypoint at (0, 0) is unlabelled (visibility 0), any other visible (2), as Ultralytics
    reads them. A bad label line (wrong count, a value outside [0, 1], an unknown class,
    a box where ``instance_mask`` needs a polygon) makes its image a bad record, named as
    ``labels file:line``.

    Args:
        data_yaml: the dataset's ``data.yaml``.
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction, order, order_seed, keypoint_sigmas: as in :func:`convert_coco`.
        split: the ``data.yaml`` key that lists the images (``train``, ``val``, ...).
        tasks: the tasks this source labels, a subset of ``YOLO_TASKS``; ``keypoints``
            needs ``kpt_shape``, ``instance_mask`` polygon lines.
        root: the dataset root, replacing ``data.yaml``'s ``path``; named by the user, so
            it may lie anywhere, but the split's files must lie inside it.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    data_yaml = Path(data_yaml)
    spec = _load_data_yaml(data_yaml)
    layout = _layout(spec, data_yaml)
    _check_tasks(tasks, layout, data_yaml, keypoint_sigmas=keypoint_sigmas)
    # Before the images are read: a bad flip_idx or --keypoint-sigmas fails at once.
    keypoints = None
    if "keypoints" in tasks:
        keypoints = _keypoint_schema(spec, layout, data_yaml, name=name, keypoint_sigmas=keypoint_sigmas)
    dataset_root = _dataset_root(spec, data_yaml, root)
    image_paths = _split_images(spec, split, data_yaml, dataset_root)
    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(data_yaml))

    def read(image: Path) -> tuple[str, int, int, list[dict]]:
        return _read_image_and_labels(image, dataset_root, layout, tasks)

    results = parallel_map(caught(read), image_paths, workers=workers, desc=f"{name}: check images and labels")
    good = bad.keep_good(image_paths, results, record=str)
    bad.check(len(image_paths))

    samples, images, annotations = _samples(good, dataset_root)
    categories = [{"id": i, "name": n} for i, n in sorted(layout.names.items())]
    manifest = Manifest(
        name=name, tasks=list(tasks), shards=[], categories=categories, keypoints=keypoints,
        annotation_file=GROUND_TRUTH_NAME,
    )
    # Pose sets: every class carries the keypoints (YOLO has one kpt_shape for all).
    keypoint_fields = {"keypoints": keypoints.names, "skeleton": keypoints.skeleton} if keypoints else {}
    ground_truth = {
        "images": images, "annotations": annotations,
        "categories": [c | keypoint_fields for c in categories],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ground_truth_file = Path(tmp) / GROUND_TRUTH_NAME
        ground_truth_file.write_bytes(json_bytes(ground_truth))
        return write_source(
            manifest,
            samples,
            Path(out_dir),
            where=str(data_yaml),
            shard_max_samples=shard_max_samples,
            shard_max_bytes=shard_max_bytes,
            workers=workers,
            skipped=bad.summary(len(image_paths)) if bad.problems else None,
            copies={GROUND_TRUTH_NAME: ground_truth_file},
            order=order,
            order_seed=order_seed,
        )


def _samples(good: list[tuple[Path, tuple[str, int, int, list[dict]]]],
             root: Path) -> tuple[list[Sample], list[dict], list[dict]]:
    """The shard samples of the kept images, and their COCO image entries and annotations.
    Ids count kept images and their objects: image ids 0..n-1, annotation ids from 1."""
    samples, images, annotations = [], [], []
    for image_id, (path, (ext, width, height, anns)) in enumerate(good):
        file_name = path.relative_to(root).as_posix()
        image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
        anns = [{"id": len(annotations) + i + 1, "image_id": image_id, **ann} for i, ann in enumerate(anns)]
        annotations.extend(anns)
        images.append(image)
        payload = json_bytes({"image": image, "annotations": anns})
        samples.append(Sample(sample_key(file_name), {ext: path, "json": payload}))
    return samples, images, annotations


def _load_data_yaml(data_yaml: Path) -> dict:
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml}: data.yaml does not exist")
    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{data_yaml}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{data_yaml}: holds a {type(spec).__name__}, expected a mapping with 'names' and the splits")
    return spec


def _layout(spec: dict, data_yaml: Path) -> YoloLayout:
    """``names`` (a list, or a mapping of class id -> name), checked against ``nc``, and
    ``kpt_shape``."""
    if "names" not in spec:
        raise ValueError(f"{data_yaml}: no 'names' (the class names)")
    raw = spec["names"]
    if isinstance(raw, list):
        raw = dict(enumerate(raw))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{data_yaml}: 'names' is {str(raw)[:60]!r}, expected a list or a mapping of class id -> name")
    for class_id, class_name in raw.items():
        if type(class_id) is not int or class_id < 0 or not isinstance(class_name, str):
            raise ValueError(f"{data_yaml}: names: {class_id!r}: {class_name!r} is not a class id >= 0 and a name")
    if "nc" in spec and spec["nc"] != len(raw):
        raise ValueError(f"{data_yaml}: nc is {spec['nc']!r} but 'names' lists {len(raw)} classes")
    if "kpt_shape" not in spec:
        return YoloLayout(names=raw)
    shape = spec["kpt_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)
            and shape[0] >= 1 and shape[1] in (2, 3)):
        raise ValueError(f"{data_yaml}: kpt_shape is {shape!r}, expected [K, 2] or [K, 3] (K keypoints of x, y[, v])")
    return YoloLayout(names=raw, num_keypoints=shape[0], keypoint_dims=shape[1])


def _check_tasks(tasks: Sequence[str], layout: YoloLayout, data_yaml: Path, *,
                 keypoint_sigmas: Sequence[float] | None) -> None:
    if not tasks or not set(tasks) <= set(YOLO_TASKS):
        raise ValueError(f"{data_yaml}: a YOLO source labels a subset of {list(YOLO_TASKS)}, got {list(tasks)}")
    if "keypoints" in tasks and layout.num_keypoints is None:
        raise ValueError(f"{data_yaml}: tasks include 'keypoints' but data.yaml has no kpt_shape")
    if "instance_mask" in tasks and layout.num_keypoints is not None:
        # A pose line holds a box and keypoints; the format has no line with a polygon too.
        raise ValueError(f"{data_yaml}: tasks include 'instance_mask' but data.yaml has kpt_shape: "
                         f"pose labels hold no polygons")
    if keypoint_sigmas is not None and "keypoints" not in tasks:
        raise ValueError(f"{data_yaml}: --keypoint-sigmas given, but the tasks {list(tasks)} exclude 'keypoints'")


def _keypoint_schema(spec: dict, layout: YoloLayout, data_yaml: Path, *, name: str,
                     keypoint_sigmas: Sequence[float] | None) -> KeypointSchema:
    assert layout.num_keypoints is not None  # _check_tasks: keypoints need kpt_shape
    count = layout.num_keypoints
    flip_idx = spec.get("flip_idx")
    if flip_idx is None:
        flip_idx = list(range(count))
        if count > 1:
            log.warning("%s: no flip_idx: keypoints keep their index when an image is flipped horizontally", data_yaml)
    if not (isinstance(flip_idx, list) and len(flip_idx) == count
            and all(type(i) is int and 0 <= i < count for i in flip_idx)
            and all(flip_idx[j] == i for i, j in enumerate(flip_idx))):
        raise ValueError(f"{data_yaml}: flip_idx {flip_idx!r} is not a list of {count} keypoint indices "
                         f"that swap in pairs (flip_idx[flip_idx[i]] == i)")
    names = _keypoint_names(spec, count, flip_idx, data_yaml)
    sigmas = _keypoint_sigmas(names, data_yaml, name=name, keypoint_sigmas=keypoint_sigmas)
    flip_map = [[names[i], names[j]] for i, j in enumerate(flip_idx) if i < j]
    return KeypointSchema(names=names, flip_map=flip_map, sigmas=sigmas)


def _keypoint_names(spec: dict, count: int, flip_idx: list[int], data_yaml: Path) -> list[str]:
    """``kpt_names`` (a list, or Ultralytics' mapping class id -> list, one list for all
    classes), COCO's person keypoints when the layout is theirs, else ``kpt_<i>``."""
    raw = spec.get("kpt_names")
    if raw is None:
        if count == len(COCO_PERSON_KEYPOINTS) and tuple(flip_idx) == COCO_PERSON_FLIP_IDX:
            return list(COCO_PERSON_KEYPOINTS)
        return [f"kpt_{i}" for i in range(count)]
    lists = list(raw.values()) if isinstance(raw, dict) else [raw]
    names = lists[0]
    if any(other != names for other in lists[1:]):
        raise ValueError(f"{data_yaml}: kpt_names differ between classes; one source holds one keypoint schema")
    if not (isinstance(names, list) and len(names) == count and all(isinstance(n, str) for n in names)
            and len(set(names)) == count):
        raise ValueError(f"{data_yaml}: kpt_names {str(names)[:80]} is not a list of {count} distinct names "
                         f"(kpt_shape)")
    return names


def _keypoint_sigmas(names: list[str], data_yaml: Path, *, name: str,
                     keypoint_sigmas: Sequence[float] | None) -> list[float]:
    """The OKS sigmas, by :func:`convert_coco`'s precedence (YOLO files carry none)."""
    return resolve_keypoint_sigmas(
        names, given=keypoint_sigmas, where=data_yaml,
        unknown=(f"source {name!r} ({data_yaml}): its {len(names)} keypoints are not COCO's 17 person keypoints; "
                 f"keypoint AP uses sigma {DEFAULT_KEYPOINT_SIGMA} for every keypoint (give --keypoint-sigmas)"),
    )


def _dataset_root(spec: dict, data_yaml: Path, root: str | Path | None) -> Path:
    """The directory the split paths are relative to, symlinks resolved: ``root`` when the
    user gives one, else ``path`` within data.yaml's directory (default: that directory)."""
    if root is not None:
        require_dir(Path(root))
        return Path(os.path.realpath(root))
    directory = Path(os.path.realpath(data_yaml.parent))
    path = spec.get("path")
    if path is None or path == "":
        return directory
    if not isinstance(path, str):
        raise ValueError(f"{data_yaml}: path {path!r} is not a string")
    resolved = Path(os.path.realpath(directory / path))
    if not _inside(directory, resolved):
        raise ValueError(
            f"{data_yaml}: path {path!r} leads out of the dataset directory {directory}; data.yaml may only name "
            f"files inside its own directory: give --root DIR to name the dataset root yourself"
        )
    require_dir(resolved)
    return resolved


def _split_images(spec: dict, split: str, data_yaml: Path, root: Path) -> list[Path]:
    """The split's images, sorted and deduplicated, each resolved inside ``root``."""
    if split not in spec or spec[split] in (None, "", []):
        present = [k for k in ("train", "val", "test") if spec.get(k)]
        raise ValueError(f"{data_yaml}: no split {split!r}; it lists {present}")
    entries = spec[split] if isinstance(spec[split], list) else [spec[split]]
    images: set[Path] = set()
    for entry in entries:
        where = f"{data_yaml}: {split}: {entry!r}"
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{where} is not a path")
        if "://" in entry:
            raise ValueError(f"{where} is a URL; download the dataset and give its local path")
        path = _resolve_inside(root, Path(entry), where=where)
        if path.is_dir():
            images.update(p for p in (_resolve_inside(root, p, where=where) for p in path.rglob("*"))
                          if p.suffix.lower() in YOLO_IMAGE_SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix == ".txt":
            images.update(_listed_images(path, root))
        else:
            raise FileNotFoundError(f"{where}: {path} is neither a directory of images nor a .txt list of them")
    if not images:
        raise ValueError(f"{data_yaml}: split {split!r} holds no images ({', '.join(YOLO_IMAGE_SUFFIXES)})")
    return sorted(images)


def _listed_images(list_file: Path, root: Path) -> list[Path]:
    """The image paths in a ``.txt`` list, one a line, relative to the list's directory."""
    images = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if line.strip():
            images.append(_resolve_inside(root, list_file.parent / line.strip(), where=f"{list_file}:{number}"))
    return images


def _resolve_inside(root: Path, path: Path, *, where: str) -> Path:
    """``path`` (relative to ``root``, or absolute), symlinks resolved; ValueError naming
    ``where`` when it lies outside ``root``."""
    resolved = Path(os.path.realpath(root / path))
    if not _inside(root, resolved):
        raise ValueError(f"{where}: {path} lies outside the dataset root {root}; not reading it")
    return resolved


def _inside(root: Path, path: Path) -> bool:
    return os.path.commonpath([root, path]) == str(root)


def _label_path(image: Path, root: Path) -> Path:
    """Ultralytics' rule: the last ``images`` directory of the path becomes ``labels``, and
    the suffix ``.txt``; applied below ``root`` only, so a label never lies outside it."""
    parts = list(image.relative_to(root).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return (root / Path(*parts)).with_suffix(".txt")


def _read_image_and_labels(image: Path, root: Path, layout: YoloLayout,
                           tasks: Sequence[str]) -> tuple[str, int, int, list[dict]]:
    """Decode the image and parse its labels: (shard extension, width, height, COCO-style
    annotations without ids). ValueError naming the image, or the label file and line."""
    ext, width, height = inspect_image(image)
    with Image.open(image) as opened:
        orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation != 1:
        # Ultralytics labels the upright image; our decoder reads the stored pixels.
        raise ValueError(f"{image}: EXIF orientation {orientation}: store the image upright (e.g. "
                         f"PIL.ImageOps.exif_transpose) so that its pixels match its labels")
    labels = _resolve_inside(root, _label_path(image, root), where=str(image))
    if not labels.is_file():
        return ext, width, height, []  # Ultralytics: an image without objects
    try:
        lines = labels.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{labels}: not a text file ({e})") from None
    anns = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            anns.append(_annotation(line, layout, tasks, width=width, height=height, where=f"{labels}:{number}"))
    return ext, width, height, anns


def _annotation(line: str, layout: YoloLayout, tasks: Sequence[str], *, width: int, height: int, where: str) -> dict:
    """One label line -> a COCO-style annotation (no ids), checked as the decoder will."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        raise ValueError(f"{where}: {line.strip()[:60]!r} is not a list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: non-finite value in {line.strip()[:60]!r}")
    class_id = values[0]
    if class_id != int(class_id) or int(class_id) not in layout.names:
        raise ValueError(f"{where}: class {line.split()[0]!r} is not one of data.yaml's class ids "
                         f"{sorted(layout.names)}")
    ann: dict = {"category_id": int(class_id), "iscrowd": 0}
    if layout.num_keypoints is not None:
        expected = 5 + layout.num_keypoints * layout.keypoint_dims
        if len(values) != expected:
            raise ValueError(f"{where}: {len(values)} values, a pose line of kpt_shape "
                             f"[{layout.num_keypoints}, {layout.keypoint_dims}] has {expected} "
                             f"(class cx cy w h, then keypoints)")
        ann |= _box(values[1:5], width=width, height=height, where=where)
        if "keypoints" in tasks:
            ann["area"] *= POSE_AREA_PER_BOX_AREA  # the OKS scale; see its definition
            ann |= _keypoints(values[5:], layout.keypoint_dims, width=width, height=height, where=where)
    elif len(values) == 5:
        if "instance_mask" in tasks:
            raise ValueError(f"{where}: a box line (class cx cy w h), but the source labels instance_mask: "
                             f"each object needs a polygon (class x1 y1 x2 y2 ...)")
        ann |= _box(values[1:], width=width, height=height, where=where)
    elif len(values) >= 7 and len(values) % 2 == 1:
        ann |= _polygon(values[1:], width=width, height=height, where=where)
    else:
        raise ValueError(f"{where}: {len(values)} values; a line is a box (class cx cy w h: 5 values) or a polygon "
                         f"of at least 3 points (class x1 y1 x2 y2 x3 y3 ...: an odd count >= 7)")
    check_annotation(ann, what=where, image_size=(height, width),
                     num_keypoints=layout.num_keypoints if "keypoints" in tasks else None,
                     require_segmentation="instance_mask" in tasks)
    return ann


def _check_normalised(values: Sequence[float], *, where: str, what: str) -> None:
    outside = [v for v in values if not 0.0 <= v <= 1.0]
    if outside:
        raise ValueError(f"{where}: {what} {outside[:4]} outside [0, 1]; YOLO coordinates are normalised by "
                         f"the image size")


def _box(values: Sequence[float], *, width: int, height: int, where: str) -> dict:
    _check_normalised(values, where=where, what="box value(s)")
    cx, cy, w, h = values
    box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
    return {"bbox": box, "area": box[2] * box[3]}


def _polygon(values: Sequence[float], *, width: int, height: int, where: str) -> dict:
    _check_normalised(values, where=where, what="polygon value(s)")
    polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]
    xs, ys = polygon[0::2], polygon[1::2]
    # Shoelace formula: the polygon's area, what COCO's 'area' of a polygon object is close to.
    area = abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"bbox": box, "area": area, "segmentation": [polygon]}


def _keypoints(values: Sequence[float], dims: int, *, width: int, height: int, where: str) -> dict:
    points = []
    for i in range(0, len(values), dims):
        x, y = values[i], values[i + 1]
        _check_normalised((x, y), where=where, what=f"keypoint {i // dims}")
        if dims == 3:
            visibility = values[i + 2]
            if visibility not in KEYPOINT_VISIBILITIES:
                raise ValueError(f"{where}: keypoint {i // dims} has visibility {visibility:g}, "
                                 f"not one of {list(KEYPOINT_VISIBILITIES)}")
        else:  # no visibility: Ultralytics takes a point at (0, 0) for an unlabelled one
            visibility = 0 if x == 0 and y == 0 else 2
        points += [x * width, y * height, int(visibility)]
    return {"keypoints": points, "num_keypoints": sum(1 for v in points[2::3] if v > 0)}
