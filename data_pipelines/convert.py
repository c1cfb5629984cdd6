"""Convert sources from their native on-disk formats into tar shards + ``manifest.json``.

Shard members follow the format in :mod:`data_pipelines.manifest`. Every converter runs
the same three steps:

1. read the source's index (COCO json, directory listing) and check its structure, and every
   annotation's fields as the decoder will (``annotation_check``);
2. decode every image (and mask) in parallel: a missing, unreadable or inconsistent file
   raises a ``FileNotFoundError``/``ValueError`` naming it *before* anything is written;
3. write the shards in parallel, each to a temporary name renamed when complete, then
   ``manifest.json`` last.

Bad input follows ``bad_sample_policy`` (see ``bad_data``): ``raise`` (the default) fails
at the first bad image or annotation as above; ``skip`` leaves each bad record out (an
image whose file or any annotation is bad, with all its annotations; an annotation that
names no image), logs it, lists it in ``skipped.json`` next to the manifest, and fails
before writing anything if more than ``max_bad_fraction`` of the records are bad.
Problems with the source as a whole (no index file, not JSON, missing top-level keys,
duplicate image ids, no images at all) fail under either policy.

Shard contents are a pure function of the input: samples go to shards in a fixed order
whatever the number of workers, and tar headers carry fixed times and owners.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_pipelines.annotation_check import check_annotation, check_image_entry, is_id
from data_pipelines.bad_data import BadRecords
from data_pipelines.manifest import MANIFEST_NAME, KeypointSchema, Manifest, ShardInfo
from data_pipelines.synthetic import DEMO_TASKS

COCO_TASKS = ("detection", "instance_mask", "keypoints")
DEFAULT_SHARD_MAX_SAMPLES = 1000
DEFAULT_SHARD_MAX_BYTES = 256 * 2**20
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# OKS sigma for keypoints whose category does not give one (COCO's range is 0.025-0.107).
DEFAULT_KEYPOINT_SIGMA = 0.05
# Several shards per demo split, so data-loader workers and ranks have shards to split.
DEMO_SHARD_MAX_SAMPLES = 32
DEFAULT_BAD_SAMPLE_POLICY = "raise"
DEFAULT_MAX_BAD_FRACTION = 0.01  # as the training loader's data.max_bad_fraction
SKIPPED_NAME = "skipped.json"  # under policy skip: the records left out, and why

# Shard member extension for each image format PIL reports; the bytes are copied unchanged.
_IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SEMANTIC_IGNORE = 255

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Sample:
    """One shard sample: member extension -> file to copy verbatim, or bytes to write."""

    key: str
    members: dict[str, Path | bytes]

    def num_bytes(self) -> int:
        return sum(m.stat().st_size if isinstance(m, Path) else len(m) for m in self.members.values())


# --- converters ---------------------------------------------------------------------------


def convert_coco(
    images_dir: str | Path,
    annotation_file: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    tasks: Sequence[str],
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> Manifest:
    """Convert a COCO instances or person-keypoints style source.

    Every image in the json becomes one sample, with or without annotations; ``<key>.json``
    holds its image dict and annotations exactly as in the file, so evaluation can score
    against the original ids. Keypoint categories (those with a ``"keypoints"`` list) give
    ``Manifest.keypoints``; flip pairs and OKS sigmas come from the category's extra keys
    ``"flip_map"`` and ``"sigmas"`` when present, otherwise flip pairs are matched by
    ``left_``/``right_`` name prefixes and sigmas default to ``DEFAULT_KEYPOINT_SIGMA``.

    Args:
        images_dir: directory that the images' ``file_name`` entries are relative to.
        annotation_file: the COCO json.
        out_dir: where shards and ``manifest.json`` go.
        name: source name; shards are ``<name>-NNNNNN.tar``.
        tasks: the tasks this source labels, a subset of ``COCO_TASKS``.
        shard_max_samples, shard_max_bytes: a shard is closed when it reaches either
            (bytes counts member payloads, not tar headers).
        workers: threads for decoding and writing.
        bad_sample_policy, max_bad_fraction: what to do with bad images and
            annotations, see the module docstring.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    images_dir, annotation_file = Path(images_dir), Path(annotation_file)
    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(annotation_file))
    _require_dir(images_dir)
    if not set(tasks) <= set(COCO_TASKS):
        raise ValueError(f"{annotation_file}: a COCO source labels a subset of {list(COCO_TASKS)}, got {list(tasks)}")
    coco, incomplete = _load_coco(annotation_file, bad)
    dropped = {i["id"] for i in incomplete if isinstance(i, dict) and is_id(i.get("id"))}
    anns_by_image, orphans = _group_annotations(
        coco, annotation_file=annotation_file, tasks=tasks, bad=bad, dropped=dropped
    )
    images = [image for image in coco["images"] if _image_record(image) not in bad]
    paths = [images_dir / image["file_name"] for image in images]

    infos = _parallel_map(_caught(_inspect_image), paths, workers=workers, desc=f"{name}: check images")
    samples = []
    for image, path, info in zip(images, paths, infos):
        if isinstance(info, Exception):
            bad.report(_image_record(image), info)
            continue
        ext, width, height = info
        if (width, height) != (image["width"], image["height"]):
            bad.report(_image_record(image), ValueError(
                f"{path}: image id {image['id']} is {width}x{height} but {annotation_file} "
                f"says {image['width']}x{image['height']}"
            ))
            continue
        payload = {"image": image, "annotations": anns_by_image[image["id"]]}
        samples.append(_Sample(_sample_key(image["file_name"]), {ext: path, "json": _json_bytes(payload)}))
    records = len(coco["images"]) + len(incomplete) + orphans
    bad.check(records)

    manifest = Manifest(
        name=name,
        tasks=list(tasks),
        shards=[],
        categories=[{"id": c["id"], "name": c["name"]} for c in coco["categories"]],
        keypoints=_keypoint_schema(coco["categories"], annotation_file),
        annotation_file=str(annotation_file.resolve()),
    )
    return _write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(annotation_file),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        skipped=bad.summary(records) if bad.problems else None,
    )


def convert_semantic(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    classes: Sequence[str],
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> Manifest:
    """Convert a VOC-style semantic segmentation source.

    Every ``<stem>.png`` in ``masks_dir`` (one channel, ``L`` or palette ``P``, pixel =
    index in ``classes``, 255 = unlabelled) is paired with ``<stem>.jpg|.jpeg|.png`` in
    ``images_dir``; images without a mask are not part of the labelled set and are skipped,
    as with VOC's JPEGImages. The mask's PNG bytes are stored unchanged as ``<key>.seg.png``.

    Args:
        images_dir, masks_dir: the two directories (searched recursively).
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction: as in :func:`convert_coco`.
        classes: class names, index = pixel value (0 is usually background).

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(masks_dir))
    _require_dir(images_dir)
    _require_dir(masks_dir)
    images_by_stem = {p.relative_to(images_dir).with_suffix("").as_posix(): p for p in _image_files(images_dir)}
    mask_paths = sorted(masks_dir.rglob("*.png"))
    if not mask_paths:
        raise ValueError(f"{masks_dir}: no .png masks found")
    pairs = []
    for mask_path in mask_paths:
        stem = mask_path.relative_to(masks_dir).with_suffix("").as_posix()
        if stem not in images_by_stem:
            missing = FileNotFoundError(f"{mask_path}: no image {stem}.jpg/.jpeg/.png in {images_dir}")
            bad.report(str(mask_path), missing)
            continue
        pairs.append((images_by_stem[stem], mask_path))

    def check(pair: tuple[Path, Path]) -> tuple[str, int, int]:
        return _inspect_semantic_pair(*pair, num_classes=len(classes))

    infos = _parallel_map(_caught(check), pairs, workers=workers, desc=f"{name}: check images")
    good = bad.keep_good(pairs, infos, record=lambda pair: str(pair[1]))
    bad.check(len(mask_paths))
    samples = []
    # The index (the json's image id) counts kept pairs: ids stay 0..n-1.
    for index, ((image_path, mask_path), (ext, width, height)) in enumerate(good):
        file_name = image_path.relative_to(images_dir).as_posix()
        payload = {"image": {"id": index, "file_name": file_name, "width": width, "height": height}, "annotations": []}
        members = {ext: image_path, "json": _json_bytes(payload), "seg.png": mask_path}
        samples.append(_Sample(_sample_key(file_name), members))

    manifest = Manifest(name=name, tasks=["semantic"], shards=[], semantic_classes=list(classes))
    return _write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(masks_dir),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        skipped=bad.summary(len(mask_paths)) if bad.problems else None,
    )


def convert_image_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> Manifest:
    """Convert an ImageFolder source, ``root/<class_name>/<image>``.

    Class names are the sorted sub-directory names (empty ones included, so every split of
    a dataset gets the same list); ``class_id`` in ``<key>.json`` indexes them. Files that
    are not .jpg/.jpeg/.png are ignored, as torchvision's ImageFolder ignores them.

    Args:
        root: the directory holding one sub-directory per class.
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction: as in :func:`convert_coco`.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    root = Path(root)
    _require_dir(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-directories")
    files = [(path, class_id) for class_id, c in enumerate(classes) for path in _image_files(root / c)]
    if not files:
        raise ValueError(f"{root}: no .jpg/.jpeg/.png images in its class sub-directories")

    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(root))
    paths = [path for path, _ in files]
    infos = _parallel_map(_caught(_inspect_image), paths, workers=workers, desc=f"{name}: check images")
    good = bad.keep_good(files, infos, record=lambda file: str(file[0]))
    bad.check(len(files))
    samples = []
    # The index (the json's image id) counts kept images: ids stay 0..n-1.
    for index, ((path, class_id), (ext, width, height)) in enumerate(good):
        file_name = path.relative_to(root).as_posix()
        payload = {
            "image": {"id": index, "file_name": file_name, "width": width, "height": height},
            "annotations": [],
            "class_id": class_id,
        }
        samples.append(_Sample(_sample_key(file_name), {ext: path, "json": _json_bytes(payload)}))

    manifest = Manifest(name=name, tasks=["classification"], shards=[], classes=classes)
    return _write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(root),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        skipped=bad.summary(len(files)) if bad.problems else None,
    )


def convert_demo(
    raw: dict[str, dict[str, Path]], out_root: str | Path, *, workers: int = DEFAULT_WORKERS
) -> dict[str, dict[str, Manifest]]:
    """Convert what :func:`data_pipelines.synthetic.generate_demo_data` wrote.

    Args:
        raw: its return value, ``{source: {split: split_dir}}``.
        out_root: each source/split goes to ``out_root/<split>/<source>/``.
        workers: threads per conversion.

    Returns:
        ``{split: {source: Manifest}}``; each manifest's ``root`` is its directory.
    """
    out_root = Path(out_root)
    manifests: dict[str, dict[str, Manifest]] = {}
    for source, splits in raw.items():
        for split, split_dir in splits.items():
            out_dir = out_root / split / source
            common = {"name": source, "shard_max_samples": DEMO_SHARD_MAX_SAMPLES, "workers": workers}
            if source in ("shapes_instances", "shapes_keypoints"):
                manifest = convert_coco(
                    split_dir / "images", split_dir / "annotations.json", out_dir, tasks=DEMO_TASKS[source], **common
                )
            elif source == "shapes_semantic":
                classes = json.loads((split_dir / "classes.json").read_text())
                manifest = convert_semantic(
                    split_dir / "images", split_dir / "masks", out_dir, classes=classes, **common
                )
            elif source == "shapes_classes":
                manifest = convert_image_folder(split_dir, out_dir, **common)
            else:
                raise ValueError(f"unknown demo source {source!r}; known: {list(DEMO_TASKS)}")
            manifests.setdefault(split, {})[source] = manifest
    return manifests


# --- reading and checking sources ---------------------------------------------------------


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: source directory does not exist")


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def _load_coco(annotation_file: Path, bad: BadRecords) -> tuple[dict, list[dict]]:
    """Load the json and check the top-level keys every COCO file has. An image entry
    lacking keys is a bad record: it is taken out of ``images`` and returned apart."""
    if not annotation_file.is_file():
        raise FileNotFoundError(f"{annotation_file}: annotation file does not exist")
    try:
        coco = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{annotation_file}: not valid JSON ({e})") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{annotation_file}: the json is a {type(coco).__name__}, expected an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise ValueError(f"{annotation_file}: missing top-level key(s) {missing}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise ValueError(f"{annotation_file}: {key!r} is {json.dumps(coco[key])[:40]}, expected a list")
    if not coco["images"]:
        raise ValueError(f"{annotation_file}: no images")
    for category in coco["categories"]:  # they make the label space: a bad one fails the source
        category_id = category.get("id") if isinstance(category, dict) else None
        if not isinstance(category_id, int) or isinstance(category_id, bool) or not isinstance(category.get("name"), str):
            raise ValueError(f"{annotation_file}: category {str(category)[:80]} needs an integer 'id' and a 'name'")
    complete, incomplete = [], []
    for index, image in enumerate(coco["images"]):
        try:
            _check_image_entry(image, annotation_file)
        except ValueError as error:
            bad.report(f"image entry #{index}", error)
            incomplete.append(image)
        else:
            complete.append(image)
    return coco | {"images": complete}, incomplete


def _check_image_entry(image: object, annotation_file: Path) -> None:
    if not isinstance(image, dict):
        raise ValueError(f"{annotation_file}: image entry {str(image)[:80]} is not an object")
    lacking = [k for k in ("id", "file_name", "width", "height") if k not in image]
    if lacking:
        raise ValueError(f"{annotation_file}: image {image.get('id', image)} lacks {lacking}")
    where = f"{annotation_file}: image {image['id']!r}"
    if not is_id(image["id"]) or not isinstance(image["file_name"], str):
        raise ValueError(f"{where}: 'id' must be an integer or string and 'file_name' a string")
    check_image_entry(image, what=where)


def _group_annotations(
    coco: dict, *, annotation_file: Path, tasks: Sequence[str], bad: BadRecords, dropped: set
) -> tuple[dict[int, list[dict]], int]:
    """Annotations per image id, in file order, after checking each one's fields; and
    the number of annotations that name no known image (each a bad record of its own).
    Annotations of the ``dropped`` image ids (incomplete entries) go with their image.

    A bad annotation of an image makes the image a bad record: training on it without
    that annotation would teach the model that the object is background.
    """
    categories = {c["id"]: c for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    images = {}
    for image in coco["images"]:
        if image["id"] in by_image:
            raise ValueError(f"{annotation_file}: duplicate image id {image['id']}")
        by_image[image["id"]] = []
        images[image["id"]] = image
    orphans = 0
    keypoint_categories = [c for c in coco["categories"] if c.get("keypoints")]
    # The decoder checks any annotation's keypoints against the source's one schema.
    num_keypoints = len(keypoint_categories[0]["keypoints"]) if "keypoints" in tasks and keypoint_categories else None
    for index, ann in enumerate(coco["annotations"]):
        ann_id = ann.get("id", f"#{index} (no id)") if isinstance(ann, dict) else f"#{index}"
        where = f"{annotation_file}: annotation id {ann_id}"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if is_id(image_id) and image_id in dropped:
            continue
        image = images.get(image_id) if is_id(image_id) else None
        try:
            _check_annotation(ann, image, categories, where=where, tasks=tasks, num_keypoints=num_keypoints)
        except ValueError as e:
            if image is None:
                orphans += 1
                bad.report(where.removeprefix(f"{annotation_file}: "), e)
            else:
                bad.report(_image_record(image), e)
            continue
        by_image[ann["image_id"]].append(ann)
    return by_image, orphans


def _check_annotation(
    ann: object, image: dict | None, categories: dict[int, dict], *, where: str, tasks: Sequence[str],
    num_keypoints: int | None,
) -> None:
    """ValueError naming ``where`` if the annotation is unusable (the decoder's checks, see
    ``annotation_check``, and the references to image and category); ``image`` is the
    image entry its ``image_id`` names, if any."""
    if not isinstance(ann, dict):
        raise ValueError(f"{where} is {json.dumps(ann)[:40]}, expected an object")
    required = ["id", "image_id", "category_id", "bbox"] + (["segmentation"] if "instance_mask" in tasks else [])
    missing = [k for k in required if k not in ann]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if not is_id(ann["image_id"]):
        raise ValueError(f"{where}: image_id {ann['image_id']!r} is not an integer or string")
    if image is None:
        raise ValueError(f"{where} refers to image id {ann['image_id']}, which is not in 'images'")
    check_annotation(ann, what=where, image_size=(image["height"], image["width"]), num_keypoints=num_keypoints,
                     require_segmentation="instance_mask" in tasks)
    category = categories.get(ann["category_id"])
    if category is None:
        raise ValueError(f"{where} has category_id {ann['category_id']}, which is not in 'categories'")
    if num_keypoints is not None and category.get("keypoints") and "keypoints" not in ann:
        raise ValueError(
            f"{where}: needs 'keypoints' with 3 x {num_keypoints} values for category {category['name']!r}"
        )


def _image_record(image: dict) -> str:
    """How a (complete) COCO image entry is named as a record: one shard sample."""
    return f"image id {image['id']} ({image['file_name']})"


def _keypoint_schema(categories: list[dict], annotation_file: Path) -> KeypointSchema | None:
    """The keypoint schema of the keypoint categories; they must all share one."""
    with_keypoints = [c for c in categories if c.get("keypoints")]
    if not with_keypoints:
        return None
    first = with_keypoints[0]
    for other in with_keypoints[1:]:
        if other["keypoints"] != first["keypoints"]:
            raise ValueError(
                f"{annotation_file}: categories {first['name']!r} and {other['name']!r} name different "
                f"keypoints; one source holds one keypoint schema"
            )
    names = list(first["keypoints"])
    sigmas = list(first.get("sigmas", [DEFAULT_KEYPOINT_SIGMA] * len(names)))
    if len(sigmas) != len(names):
        raise ValueError(
            f"{annotation_file}: category {first['name']!r} has {len(sigmas)} sigmas for {len(names)} keypoints"
        )
    # COCO person names its sides left_*/right_*: pair them when the category gives no map.
    mirrored = {n: "right_" + n.removeprefix("left_") for n in names if n.startswith("left_")}
    flip_map = first.get("flip_map") or [[left, right] for left, right in mirrored.items() if right in names]
    schema = KeypointSchema(names=names, skeleton=list(first.get("skeleton", [])), flip_map=flip_map, sigmas=sigmas)
    try:
        schema.flip_permutation()
    except ValueError as e:
        raise ValueError(f"{annotation_file}: {e}") from None
    return schema


def _inspect_image(path: Path) -> tuple[str, int, int]:
    """Fully decode ``path``; ``verify()`` alone misses truncated JPEGs.

    Returns:
        (shard member extension, width, height).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            fmt, size = image.format, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL: unreadable or corrupt
        raise ValueError(f"{path}: not a decodable image ({e})") from None
    if fmt not in _IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: image format {fmt}; shards hold JPEG or PNG images")
    return _IMAGE_EXTENSIONS[fmt], *size


def _inspect_semantic_pair(image_path: Path, mask_path: Path, *, num_classes: int) -> tuple[str, int, int]:
    """Decode image and mask; the mask must be a one-channel PNG of the image's size with known ids."""
    ext, width, height = _inspect_image(image_path)
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            fmt, mode, size = mask.format, mask.mode, mask.size
            values = np.unique(np.asarray(mask))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{mask_path}: not a decodable mask ({e})") from None
    if fmt != "PNG" or mode not in ("L", "P"):
        raise ValueError(f"{mask_path}: mask is {fmt} mode {mode}; expected a one-channel PNG (mode L or P)")
    if size != (width, height):
        raise ValueError(f"{mask_path}: mask is {size[0]}x{size[1]} but its image {image_path} is {width}x{height}")
    unknown = [int(v) for v in values if v >= num_classes and v != _SEMANTIC_IGNORE]
    if unknown:
        raise ValueError(f"{mask_path}: pixel values {unknown} are neither a class index (< {num_classes}) nor 255")
    return ext, width, height


def _sample_key(file_name: str) -> str:
    """Tar-safe key from a relative file name: webdataset splits a member name at its first
    dot after the last slash, so the key keeps only letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(file_name).with_suffix("")))


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


# --- writing ------------------------------------------------------------------------------


def _write_source(
    manifest: Manifest,
    samples: list[_Sample],
    out_dir: Path,
    *,
    where: str,
    shard_max_samples: int,
    shard_max_bytes: int,
    workers: int,
    skipped: dict | None = None,
) -> Manifest:
    """Plan shards, check the manifest, write shards, then save the manifest.

    ``where`` (the source's file or directory) prefixes error messages; ``skipped``
    (``BadRecords.summary``) is saved as ``skipped.json``, before the manifest.
    """
    keys: set[str] = set()
    for sample in samples:
        if sample.key in keys:
            raise ValueError(f"{where}: two images map to the same shard key {sample.key!r}; rename one")
        keys.add(sample.key)
    plan = _plan_shards(samples, max_samples=shard_max_samples, max_bytes=shard_max_bytes)
    shard_paths = [out_dir / f"{manifest.name}-{i:06d}.tar" for i in range(len(plan))]
    manifest.shards = [ShardInfo(path=p.name, num_samples=len(s)) for p, s in zip(shard_paths, plan)]
    manifest.validate(where)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop an older manifest first: while shards are rewritten the directory must read as
    # incomplete, not as the old source pointing at new shards.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / SKIPPED_NAME).unlink(missing_ok=True)  # an earlier run's, not this one's
    try:
        jobs = list(zip(shard_paths, plan))
        sizes = _parallel_map(_write_shard, jobs, workers=workers, desc=f"{manifest.name}: write shards")
    except BaseException:
        # Without its manifest a half-written source is never read; remove it all the same,
        # so a failed run leaves no tar behind to be mistaken for output.
        for path in shard_paths:
            for leftover in (path, _temporary(path)):
                if leftover.is_file():
                    leftover.unlink()
        raise
    for info, size in zip(manifest.shards, sizes):
        info.num_bytes = size
    if skipped is not None:
        (out_dir / SKIPPED_NAME).write_text(json.dumps(skipped, indent=1) + "\n")
    manifest.save(out_dir)
    manifest.root = str(out_dir)
    return manifest


def _plan_shards(samples: list[_Sample], *, max_samples: int, max_bytes: int) -> list[list[_Sample]]:
    """Split samples, in order, into shards of at most ``max_samples`` samples and, unless a
    single sample is larger, ``max_bytes`` payload bytes."""
    shards: list[list[_Sample]] = [[]]
    size = 0
    for sample in samples:
        sample_bytes = sample.num_bytes()
        if shards[-1] and (len(shards[-1]) >= max_samples or size + sample_bytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(sample)
        size += sample_bytes
    return shards


def _write_shard(job: tuple[Path, list[_Sample]]) -> int:
    """Write one shard under a temporary name and rename it; returns its size in bytes."""
    path, samples = job
    tmp = _temporary(path)
    with open(tmp, "wb") as stream:
        # Fixed mtime (and TarWriter's fixed owner names) make shards byte-reproducible;
        # PAX headers allow keys longer than USTAR's 100-character names.
        with wds.TarWriter(stream, encoder=False, mtime=0, format="PAX_FORMAT") as writer:
            for sample in samples:
                members = {ext: m.read_bytes() if isinstance(m, Path) else m for ext, m in sample.members.items()}
                writer.write({"__key__": sample.key, **members})
    os.replace(tmp, path)
    return path.stat().st_size


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _parallel_map(fn: Callable[[T], R], items: list[T], *, workers: int, desc: str) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, in order, with a progress bar.

    Threads suffice: decoding (PIL) and file I/O release the GIL. The first failing item
    (in input order) raises its own exception.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="it", leave=False))


def _caught(fn: Callable[[T], R]) -> Callable[[T], R | FileNotFoundError | ValueError]:
    """``fn`` returning, instead of raising, the errors that name a bad input file, so
    the caller can apply the bad-sample policy to each item in input order."""

    def call(item: T) -> R | FileNotFoundError | ValueError:
        try:
            return fn(item)
        except (FileNotFoundError, ValueError) as e:
            return e

    return call
