"""The fields of a COCO-style image entry and annotation, checked where they are read.

One check for the converters (before anything is written) and the decoder (every training
sample), so that what a converter accepts the decoder never rejects, and a mistyped field
(``null``, a list for a number, a polygon of two points) is a ``ValueError`` saying what is
wrong instead of a ``TypeError`` deep inside torch or pycocotools. Messages start with the
caller's ``what`` (e.g. ``"annotation 3"`` or ``"coco.json: annotation id 17"``); the caller
adds shard and key, or file.
"""
from __future__ import annotations

import math

# A polygon needs 3 points to enclose anything; pycocotools takes a 2-point one for a box
# and fails on a 1-point one.
MIN_POLYGON_POINTS = 3
KEYPOINT_VISIBILITIES = (0, 1, 2)  # COCO: not labelled, labelled but hidden, visible


def is_number(v: object) -> bool:
    """A JSON number (bool is an int to Python, not to JSON)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_id(v: object) -> bool:
    """An id usable as a key: a JSON integer or string."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def check_image_entry(image: object, *, what: str) -> tuple[int, int]:
    """``image``'s (height, width), both positive integers; ValueError naming ``what``."""
    if not isinstance(image, dict):
        raise ValueError(f"{what} is {_kind(image)}, expected an object with 'width' and 'height'")
    missing = [k for k in ("width", "height") if k not in image]
    if missing:
        raise ValueError(f"{what} is missing key(s) {missing}")
    for key in ("width", "height"):
        value = image[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what}: {key} {value!r} is not a positive integer")
    return image["height"], image["width"]


def check_annotation_list(annotations: object, *, what: str) -> list:
    if not isinstance(annotations, list):
        raise ValueError(f"{what} is {_kind(annotations)}, expected a list of annotations")
    return annotations


def check_annotation(
    ann: object, *, what: str, image_size: tuple[int, int], num_keypoints: int | None, require_segmentation: bool
) -> None:
    """ValueError naming ``what`` unless ``ann`` is a usable annotation.

    Args:
        image_size: (height, width) of the image, which an RLE must match.
        num_keypoints: K of the source's keypoint schema: ``keypoints``, when present, must
            be 3 x K numbers (x, y, visibility); None: the source labels no keypoints and
            they are not read.
        require_segmentation: the source labels instance masks.
    """
    if not isinstance(ann, dict):
        raise ValueError(f"{what} is {_kind(ann)}, expected an object")
    required = ("bbox", "category_id", "segmentation") if require_segmentation else ("bbox", "category_id")
    missing = [k for k in required if k not in ann]
    if missing:
        raise ValueError(f"{what} is missing key(s) {missing}")
    category_id = ann["category_id"]
    if not isinstance(category_id, int) or isinstance(category_id, bool):
        raise ValueError(f"{what}: category_id {ann['category_id']!r} is not an integer")
    check_bbox(ann["bbox"], what=what)
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        raise ValueError(f"{what}: iscrowd {ann['iscrowd']!r} is not 0 or 1")
    if "area" in ann and not (is_number(ann["area"]) and math.isfinite(ann["area"]) and ann["area"] >= 0):
        raise ValueError(f"{what}: area {ann['area']!r} is not a finite number >= 0")
    if "segmentation" in ann:
        check_segmentation(ann["segmentation"], what=what, image_size=image_size)
    if num_keypoints is not None and "keypoints" in ann:
        check_keypoints(ann["keypoints"], what=what, num_keypoints=num_keypoints)


def check_bbox(bbox: object, *, what: str) -> None:
    """[x, y, w, h]: four finite numbers, w and h >= 0."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise ValueError(f"{what}: bbox {bbox!r} is not [x, y, w, h]")
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"{what}: bbox {bbox} has a non-finite coordinate")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{what}: bbox {bbox} has a negative size")


def check_segmentation(segm: object, *, what: str, image_size: tuple[int, int]) -> None:
    """Polygons (a list of flat [x1, y1, x2, y2, ...] lists of >= 3 finite points; an empty
    list labels no pixels) or an RLE of the image's size."""
    if isinstance(segm, list):
        for j, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(is_number(v) and math.isfinite(v) for v in poly):
                raise ValueError(f"{what}: segmentation polygon {j} is not a list of finite numbers")
            if len(poly) % 2 or len(poly) < 2 * MIN_POLYGON_POINTS:
                raise ValueError(
                    f"{what}: segmentation polygon {j} has {len(poly)} values, expected x, y pairs of at least "
                    f"{MIN_POLYGON_POINTS} points"
                )
        return
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"{what}: segmentation is neither polygons nor RLE: {str(segm)[:80]}")
    height, width = image_size
    if segm["size"] != [height, width]:
        raise ValueError(f"{what}: RLE size {segm['size']} != image size {[height, width]}")
    counts = segm["counts"]
    if isinstance(counts, list):  # uncompressed: runs over every pixel
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"{what}: RLE counts are not non-negative integers")
        if sum(counts) != height * width:
            raise ValueError(f"{what}: RLE counts cover {sum(counts)} pixels, the image has {height * width}")
    elif not isinstance(counts, str):
        raise ValueError(f"{what}: RLE counts are {_kind(counts)}, expected a list or a compressed string")


def check_keypoints(values: object, *, what: str, num_keypoints: int) -> None:
    """3 x K finite numbers (x, y, visibility 0/1/2)."""
    if not isinstance(values, list) or len(values) != 3 * num_keypoints or not all(is_number(v) for v in values):
        got = f"{len(values)} values" if isinstance(values, list) else _kind(values)
        raise ValueError(f"{what}: keypoints are {got}, expected 3 x {num_keypoints} numbers (x, y, v)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: non-finite keypoint values")
    if any(v not in KEYPOINT_VISIBILITIES for v in values[2::3]):
        raise ValueError(f"{what}: keypoint visibilities {values[2::3]} are not all in {list(KEYPOINT_VISIBILITIES)}")


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
