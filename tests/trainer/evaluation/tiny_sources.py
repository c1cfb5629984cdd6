"""Tiny validation sources of every kind, written in their native formats and converted
with the real converters.

Chosen to catch id and coordinate mapping bugs: images are not square and alternate
between landscape and portrait (an x/y swap shows), COCO category ids and image ids are
not contiguous, there are crowd regions, an image without annotations, a category
without keypoints next to one with, and a keypoint-only source. Originals are 64x48 or
48x64 and ``IMAGE_SIZE`` is an integer multiple of both sides, so a perfect prediction
survives the resize and its inverse exactly (nearest upsampling, bilinear back).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.conversion import COCO_PERSON_KEYPOINTS, convert_coco, convert_image_folder, convert_semantic

IMAGE_SIZE = 192  # 64 * 3 = 48 * 4
NUM_IMAGES = 5  # odd, so 2 ranks get unequal shares
SHARD_SIZE = 2  # several shards per source
SOURCES = ("tiny_instances", "tiny_people", "tiny_figures", "tiny_semantic", "tiny_classes")

INSTANCE_CATEGORIES = [{"id": 2, "name": "box"}, {"id": 5, "name": "wedge"}, {"id": 11, "name": "blob"}]
KEYPOINT_NAMES = ["nose", "left_hand", "right_hand"]
KEYPOINT_SIGMAS = [0.03, 0.06, 0.08]
_KEYPOINT_FIELDS = {
    "keypoints": KEYPOINT_NAMES,
    "skeleton": [[1, 2], [1, 3]],
    "flip_map": [["left_hand", "right_hand"]],
    "sigmas": KEYPOINT_SIGMAS,
}
PEOPLE_CATEGORIES = [{"id": 4, "name": "person", **_KEYPOINT_FIELDS}, {"id": 9, "name": "ball"}]
FIGURE_CATEGORIES = [{"id": 1, "name": "figure", **_KEYPOINT_FIELDS}]
SEMANTIC_CLASSES = ["ground", "sky", "road"]
IMAGE_CLASSES = ["cat", "dog", "eel"]


def image_shape(index: int) -> tuple[int, int]:
    """(height, width) of image ``index``: landscape and portrait in turn."""
    return (48, 64) if index % 2 == 0 else (64, 48)


def image_id(index: int) -> int:
    return 100 + 7 * index


def write_tiny_sources(root: Path) -> dict[str, Path]:
    """Write raw data under ``root/raw`` and converted sources under ``root/<name>``."""
    rng = np.random.default_rng(0)
    raw = root / "raw"
    out = {}
    common = {"shard_max_samples": SHARD_SIZE, "workers": 1}
    for name, categories, tasks, make in (
        ("tiny_instances", INSTANCE_CATEGORIES, ["detection", "instance_mask"], _instance_annotations),
        ("tiny_people", PEOPLE_CATEGORIES, ["detection", "keypoints"], _people_annotations),
        ("tiny_figures", FIGURE_CATEGORIES, ["keypoints"], _figure_annotations),
    ):
        images_dir = raw / name / "images"
        images = _write_images(images_dir, rng)
        annotations = [a for i, image in enumerate(images) for a in make(i, image, rng)]
        for ann_id, ann in enumerate(annotations, start=1):
            ann["id"] = ann_id * 3  # non-contiguous annotation ids too
        coco_file = raw / name / "annotations.json"
        coco_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        convert_coco(images_dir, coco_file, root / name, name=name, tasks=tasks, **common)
        out[name] = root / name

    images_dir, masks_dir = raw / "tiny_semantic" / "images", raw / "tiny_semantic" / "masks"
    masks_dir.mkdir(parents=True)
    for i, image in enumerate(_write_images(images_dir, rng)):
        Image.fromarray(_semantic_mask(i, rng)).save(masks_dir / image["file_name"])
    convert_semantic(
        images_dir, masks_dir, root / "tiny_semantic", name="tiny_semantic", classes=SEMANTIC_CLASSES, **common
    )
    out["tiny_semantic"] = root / "tiny_semantic"

    folder = raw / "tiny_classes"
    for i in range(NUM_IMAGES):
        class_dir = folder / IMAGE_CLASSES[i % len(IMAGE_CLASSES)]
        class_dir.mkdir(parents=True, exist_ok=True)
        _save_png(class_dir / f"{i:03d}.png", image_shape(i), rng)
    convert_image_folder(folder, root / "tiny_classes", name="tiny_classes", **common)
    out["tiny_classes"] = root / "tiny_classes"
    return out


def _write_images(directory: Path, rng: np.random.Generator) -> list[dict]:
    directory.mkdir(parents=True)
    images = []
    for i in range(NUM_IMAGES):
        height, width = image_shape(i)
        file_name = f"{i:03d}.png"
        _save_png(directory / file_name, (height, width), rng)
        images.append({"id": image_id(i), "file_name": file_name, "width": width, "height": height})
    return images


def _save_png(path: Path, shape: tuple[int, int], rng: np.random.Generator) -> None:
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


def _polygon_annotation(image: dict, category_id: int, polygon: list[float], **extra) -> dict:
    rle = mask_utils.frPyObjects([polygon], image["height"], image["width"])
    xs, ys = polygon[0::2], polygon[1::2]
    return {
        "image_id": image["id"], "category_id": category_id, "iscrowd": 0, "segmentation": [polygon],
        "area": float(mask_utils.area(rle)[0]), "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        **extra,
    }


def _random_box(image: dict, rng: np.random.Generator) -> tuple[float, float, float, float]:
    w, h = rng.integers(10, 22, size=2)
    x0 = rng.integers(1, image["width"] - w - 1)
    y0 = rng.integers(1, image["height"] - h - 1)
    return float(x0), float(y0), float(x0 + w), float(y0 + h)


def _instance_annotations(index: int, image: dict, rng: np.random.Generator) -> list[dict]:
    if index == 3:
        return []  # an image without annotations
    anns = []
    for k in range(1 + index % 3):
        x0, y0, x1, y1 = _random_box(image, rng)
        category = INSTANCE_CATEGORIES[(index + k) % len(INSTANCE_CATEGORIES)]["id"]
        if category == 5:  # a wedge: a triangle, so masks are not just boxes
            polygon = [x0, y1, x1, y1, x0, y0]
        else:
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
        anns.append(_polygon_annotation(image, category, polygon))
    if index == 1:
        anns.append(_crowd(image, category_id=2))
    return anns


def _crowd(image: dict, *, category_id: int, **extra) -> dict:
    """An iscrowd region in uncompressed RLE, as COCO stores them."""
    mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    mask[2:12, 2:20:3] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    counts, value, run = [], 0, 0
    for pixel in mask.flatten(order="F"):
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {
        "image_id": image["id"], "category_id": category_id, "iscrowd": 1,
        "segmentation": {"size": [image["height"], image["width"]], "counts": counts},
        "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], **extra,
    }


def _keypoints(box: tuple[float, float, float, float], visibility: list[int]) -> dict:
    x0, y0, x1, y1 = box
    points = [((x0 + x1) / 2, y0 + 2.0), (x0 + 1.5, (y0 + y1) / 2), (x1 - 1.5, y1 - 2.0)]
    values = []
    for (x, y), v in zip(points, visibility):
        values += [x, y, v] if v else [0.0, 0.0, 0]
    return {"keypoints": values, "num_keypoints": sum(v > 0 for v in visibility)}


def _people_annotations(index: int, image: dict, rng: np.random.Generator) -> list[dict]:
    anns = []
    for k in range(1 + index % 2):
        box = _random_box(image, rng)
        visibility = [2, 1, 2] if k == 0 else [2, 0, 2]
        anns.append(_box_annotation(image, 4, box, **_keypoints(box, visibility)))
    # A ball: a category without keypoints in a keypoint source.
    anns.append(_box_annotation(image, 9, _random_box(image, rng), num_keypoints=0))
    if index == 2:
        anns.append(_crowd(image, category_id=4, num_keypoints=0, keypoints=[0] * 3 * len(KEYPOINT_NAMES)))
    return anns


def _figure_annotations(index: int, image: dict, rng: np.random.Generator) -> list[dict]:
    box = _random_box(image, rng)
    return [_box_annotation(image, 1, box, **_keypoints(box, [2, 2, 1]))]


def _box_annotation(image: dict, category_id: int, box: tuple[float, float, float, float], **extra) -> dict:
    x0, y0, x1, y1 = box
    return _polygon_annotation(image, category_id, [x0, y0, x1, y0, x1, y1, x0, y1], **extra)


def _semantic_mask(index: int, rng: np.random.Generator) -> np.ndarray:
    height, width = image_shape(index)
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in _random_box({"height": height, "width": width}, rng))
    mask[y0:y1, x0:x1] = 1 + index % 2
    mask[: height // 4] = 2 if index % 2 == 0 else 1
    mask[y0, x0:x1] = 255  # unlabelled boundary
    return mask


def write_coco_person_source(root: Path, *, name: str = "coco_people") -> tuple[Path, Path]:
    """A COCO person-keypoints style source as COCO ships it: one "person" category with
    COCO's 17 keypoint names and no ``sigmas``; two people per image, some joints unlabelled.
    Writes raw data under ``root/raw`` and converts it to ``root/<name>``.

    Returns:
        (the raw COCO json, the converted source directory).
    """
    rng = np.random.default_rng(1)
    images_dir = root / "raw" / name / "images"
    images = _write_images(images_dir, rng)
    annotations = []
    for image in images:
        for _ in range(2):
            box = _random_box(image, rng)
            x0, y0, x1, y1 = box
            keypoints = []
            for _ in COCO_PERSON_KEYPOINTS:
                visible = rng.random() < 0.8
                x, y = rng.uniform(x0 + 1, x1 - 1), rng.uniform(y0 + 1, y1 - 1)
                keypoints += [round(x, 1), round(y, 1), 2] if visible else [0.0, 0.0, 0]
            num = sum(v > 0 for v in keypoints[2::3])
            annotations.append(_box_annotation(image, 1, box, keypoints=keypoints, num_keypoints=num))
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_PERSON_KEYPOINTS),
                "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13]]}
    coco_file = root / "raw" / name / "person_keypoints.json"
    coco_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [category]}))
    convert_coco(images_dir, coco_file, root / name, name=name, tasks=["detection", "keypoints"],
                 shard_max_samples=SHARD_SIZE, workers=1)
    return coco_file, root / name
