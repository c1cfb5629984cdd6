"""COCO instances / person-keypoints json + image folder -> shards (see :mod:`data_pipelines.conversion`)."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.annotation_check import check_annotation, check_image_entry, is_id
from data_pipelines.bad_data import BadRecords
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
from data_pipelines.manifest import KeypointSchema, Manifest, bad_keypoint_sigmas

log = logging.getLogger(__name__)

COCO_TASKS = ("detection", "instance_mask", "keypoints")
# The converted source's copy of its COCO json, which evaluation scores against.
GROUND_TRUTH_NAME = "annotations.json"
# COCO's person keypoints, in the order of its person_keypoints files (which carry no sigmas).
COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's official OKS sigmas for them, computed as pycocotools' COCOeval does (its default
# kpt_oks_sigmas: np.array([...]) / 10.0), so the floats and hence keypoint AP are identical.
COCO_PERSON_SIGMAS = tuple(
    s / 10.0 for s in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
)
# OKS sigma for keypoints nothing else gives one for (COCO's range is 0.025-0.107); warned.
DEFAULT_KEYPOINT_SIGMA = 0.05


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
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
    keypoint_sigmas: Sequence[float] | None = None,
) -> Manifest:
    """Convert a COCO instances or person-keypoints style source.

    Every image in the json becomes one sample, with or without annotations; ``<key>.json``
    holds its image dict and annotations exactly as in the file, so evaluation can score
    against the original ids. The json itself is copied into ``out_dir`` as
    ``annotations.json`` (the manifest's ``annotation_file``, relative to it), so the
    source directory is self-contained. Keypoint categories (those with a ``"keypoints"``
    list) give ``Manifest.keypoints``; flip pairs come from the category's extra key
    ``"flip_map"``, otherwise they are matched by ``left_``/``right_`` name prefixes. OKS
    sigmas, first found: ``keypoint_sigmas``, the category's extra key ``"sigmas"``, COCO's
    official ones when the names are COCO's 17 person keypoints in COCO's order, else
    ``DEFAULT_KEYPOINT_SIGMA`` with a warning.

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
        keypoint_sigmas: OKS sigmas, one per keypoint (finite, > 0), over the category's.
        order, order_seed: ``"shuffled"`` (default): samples go to shards in a seeded random
            order, so that no shard holds one class or one stretch of a collection;
            ``"original"``: in the json's order. Both are recorded in the manifest.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    images_dir, annotation_file = Path(images_dir), Path(annotation_file)
    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(annotation_file))
    require_dir(images_dir)
    if not set(tasks) <= set(COCO_TASKS):
        raise ValueError(f"{annotation_file}: a COCO source labels a subset of {list(COCO_TASKS)}, got {list(tasks)}")
    if keypoint_sigmas is not None and "keypoints" not in tasks:
        raise ValueError(f"{annotation_file}: --keypoint-sigmas given, but the tasks {list(tasks)} exclude 'keypoints'")
    coco, incomplete = _load_coco(annotation_file, bad)
    # Before the images are read: a bad --keypoint-sigmas fails at once.
    keypoints = _keypoint_schema(coco["categories"], annotation_file, name=name, keypoint_sigmas=keypoint_sigmas)
    dropped = {i["id"] for i in incomplete if isinstance(i, dict) and is_id(i.get("id"))}
    anns_by_image, orphans = _group_annotations(
        coco, annotation_file=annotation_file, tasks=tasks, bad=bad, dropped=dropped
    )
    images = [image for image in coco["images"] if _image_record(image) not in bad]
    paths = [images_dir / image["file_name"] for image in images]

    infos = parallel_map(caught(inspect_image), paths, workers=workers, desc=f"{name}: check images")
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
        samples.append(Sample(sample_key(image["file_name"]), {ext: path, "json": json_bytes(payload)}))
    records = len(coco["images"]) + len(incomplete) + orphans
    bad.check(records)

    manifest = Manifest(
        name=name,
        tasks=list(tasks),
        shards=[],
        categories=[{"id": c["id"], "name": c["name"]} for c in coco["categories"]],
        keypoints=keypoints,
        annotation_file=GROUND_TRUTH_NAME,
    )
    return write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(annotation_file),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        order=order,
        order_seed=order_seed,
        skipped=bad.summary(records) if bad.problems else None,
        # The original, byte for byte: evaluation scores as pycocotools on it would.
        copies={GROUND_TRUTH_NAME: annotation_file},
    )


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


def _keypoint_schema(
    categories: list[dict], annotation_file: Path, *, name: str, keypoint_sigmas: Sequence[float] | None
) -> KeypointSchema | None:
    """The keypoint schema of the keypoint categories; they must all share one."""
    with_keypoints = [c for c in categories if c.get("keypoints")]
    if not with_keypoints:
        if keypoint_sigmas is not None:
            raise ValueError(f"{annotation_file}: --keypoint-sigmas given, but no category has keypoints")
        return None
    first = with_keypoints[0]
    for other in with_keypoints[1:]:
        if other["keypoints"] != first["keypoints"]:
            raise ValueError(
                f"{annotation_file}: categories {first['name']!r} and {other['name']!r} name different "
                f"keypoints; one source holds one keypoint schema"
            )
    names = list(first["keypoints"])
    sigmas = _keypoint_sigmas(first, names, annotation_file, name=name, keypoint_sigmas=keypoint_sigmas)
    # COCO person names its sides left_*/right_*: pair them when the category gives no map.
    mirrored = {n: "right_" + n.removeprefix("left_") for n in names if n.startswith("left_")}
    flip_map = first.get("flip_map") or [[left, right] for left, right in mirrored.items() if right in names]
    schema = KeypointSchema(names=names, skeleton=list(first.get("skeleton", [])), flip_map=flip_map, sigmas=sigmas)
    try:
        schema.flip_permutation()
    except ValueError as e:
        raise ValueError(f"{annotation_file}: {e}") from None
    return schema


def _keypoint_sigmas(
    category: dict, names: list[str], annotation_file: Path, *, name: str, keypoint_sigmas: Sequence[float] | None
) -> list[float]:
    """The OKS sigmas keypoint AP is scored with, by the precedence of ``convert_coco``."""
    return resolve_keypoint_sigmas(
        names, given=keypoint_sigmas, declared=category.get("sigmas"),
        declared_what=f"category {category['name']!r}: 'sigmas'", where=annotation_file,
        unknown=(f"source {name!r} ({annotation_file}): category {category['name']!r} gives no OKS sigmas for its "
                 f"{len(names)} keypoints and they are not COCO's 17 person keypoints; keypoint AP uses sigma "
                 f"{DEFAULT_KEYPOINT_SIGMA} for every keypoint (give --keypoint-sigmas or the category's 'sigmas')"),
    )


def resolve_keypoint_sigmas(names: list[str], *, given: Sequence[float] | None, declared: object | None = None,
                            declared_what: str = "", where: Path, unknown: str) -> list[float]:
    """OKS sigmas, first found: ``given`` (--keypoint-sigmas), ``declared`` by the source,
    COCO's for COCO's 17 person keypoints, else the default with the ``unknown`` warning.
    Every converter that writes keypoints takes them from here."""
    if given is not None:
        sigmas, what = list(given), "--keypoint-sigmas"
    elif declared is not None:
        sigmas, what = declared, declared_what
    elif tuple(names) == COCO_PERSON_KEYPOINTS:
        return list(COCO_PERSON_SIGMAS)
    else:
        # Keypoint AP then depends on a made-up tolerance: say so, once per source.
        log.warning("%s", unknown)
        return [DEFAULT_KEYPOINT_SIGMA] * len(names)
    problem = bad_keypoint_sigmas(sigmas, len(names))
    if problem:
        raise ValueError(f"{where}: {what} {problem} ({names})")
    return [float(s) for s in sigmas]
