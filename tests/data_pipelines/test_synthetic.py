"""The demo generator writes real native formats whose labels match the drawn pixels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from pycocotools.coco import COCO

from data_pipelines.demo.synthetic import (
    DEMO_TASKS,
    INSTANCE_CATEGORY_IDS,
    KEYPOINT_NAMES,
    SEMANTIC_CLASSES,
    SHAPES,
    generate_demo_data,
)

NUM_IMAGES = {"train": 12, "val": 4}
SIZE = 128


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return generate_demo_data(tmp_path_factory.mktemp("raw"), seed=0, num_images=NUM_IMAGES, image_size=SIZE)


def _digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _coco(path: Path) -> COCO:
    coco = COCO()  # COCO(path) prints progress; build the index from the loaded dict instead
    coco.dataset = json.loads(path.read_text())
    coco.createIndex()
    return coco


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
        return np.asarray(image, dtype=float)


def _filtered(mask: np.ndarray, size: int, grow: bool) -> np.ndarray:
    f = ImageFilter.MaxFilter(size) if grow else ImageFilter.MinFilter(size)
    return np.array(Image.fromarray(mask.astype(np.uint8) * 255).filter(f)) > 0


def test_returns_every_source_and_split_in_its_native_layout(raw):
    assert list(raw) == list(DEMO_TASKS)
    for source, splits in raw.items():
        assert list(splits) == list(NUM_IMAGES)
        for split, split_dir in splits.items():
            if source in ("shapes_instances", "shapes_keypoints"):
                assert len(list((split_dir / "images").glob("*.jpg"))) == NUM_IMAGES[split]
                assert (split_dir / "annotations.json").is_file()
            elif source == "shapes_semantic":
                assert len(list((split_dir / "images").glob("*.jpg"))) == NUM_IMAGES[split]
                assert len(list((split_dir / "masks").glob("*.png"))) == NUM_IMAGES[split]
            else:
                assert sorted(p.name for p in split_dir.iterdir()) == sorted(SHAPES)
                assert len(list(split_dir.glob("*/*.jpg"))) == NUM_IMAGES[split]


def test_same_seed_gives_identical_bytes_and_another_seed_different(raw, tmp_path):
    root = next(iter(raw["shapes_instances"].values())).parents[1]
    again = generate_demo_data(tmp_path / "again", seed=0, num_images=NUM_IMAGES, image_size=SIZE)
    other = generate_demo_data(tmp_path / "other", seed=1, num_images=NUM_IMAGES, image_size=SIZE)
    assert _digests(tmp_path / "again") == _digests(root)
    original, other_digests = _digests(root), _digests(tmp_path / "other")
    assert other_digests.keys() == original.keys()
    unchanged = {name for name, digest in other_digests.items() if digest == original[name]}
    assert unchanged == {f"shapes_semantic/{split}/classes.json" for split in NUM_IMAGES}
    assert list(again) == list(other) == list(raw)


def test_rejects_an_empty_split(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_demo_data(tmp_path, num_images={"train": 0})


def test_instances_are_coco_with_every_segmentation_kind_matching_the_pixels(raw):
    split_dir = raw["shapes_instances"]["train"]
    coco = _coco(split_dir / "annotations.json")
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {v: k for k, v in INSTANCE_CATEGORY_IDS.items()}
    assert sorted(INSTANCE_CATEGORY_IDS.values()) != list(range(1, len(SHAPES) + 1))  # really non-contiguous
    kinds = set()
    for image_id, image in coco.imgs.items():
        pixels = _image(split_dir / "images" / image["file_name"])
        for ann in coco.imgToAnns[image_id]:
            segmentation = ann["segmentation"]
            kind = "polygon" if isinstance(segmentation, list) else type(segmentation["counts"]).__name__
            kinds.add((kind, ann["iscrowd"]))
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"]
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert x - 1 <= xs.min() and xs.max() <= x + w and y - 1 <= ys.min() and ys.max() <= y + h
            if not ann["iscrowd"]:
                # The drawn shape stands out from what surrounds it: the mask is what was drawn.
                inside = pixels[_filtered(mask, 5, grow=False)].mean(axis=0)
                ring = pixels[_filtered(mask, 9, grow=True) & ~_filtered(mask, 3, grow=True)].mean(axis=0)
                assert np.abs(inside - ring).sum() > 100
    assert kinds == {("polygon", 0), ("str", 0), ("list", 1)}  # polygons, compressed RLE, crowd RLE
    assert any(not coco.imgToAnns[i] for i in coco.imgs)  # some images have no annotations


def test_keypoints_visibility_flip_pairs_and_sigmas(raw):
    split_dir = raw["shapes_keypoints"]["train"]
    coco = _coco(split_dir / "annotations.json")
    (category,) = coco.dataset["categories"]
    names = category["keypoints"]
    assert names == KEYPOINT_NAMES and len(category["sigmas"]) == len(names)
    assert all(a in names and b in names and a.startswith("left_") for a, b in category["flip_map"])
    assert all(1 <= i <= len(names) for pair in category["skeleton"] for i in pair)
    seen = set()
    for ann in coco.dataset["annotations"]:
        kp = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        visible = coco.annToMask(ann).astype(bool)
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum()) and ann["iscrowd"] == 0
        for x, y, v in kp:
            seen.add(int(v))
            if v == 0:
                assert x == y == 0
            else:
                assert 0 <= x < SIZE and 0 <= y < SIZE
                # v=2 joints lie on the figure's visible pixels; v=1 ones are hidden by an occluder.
                assert visible[int(y), int(x)] == (v == 2)
        left, right = names.index("left_hand"), names.index("right_hand")
        if kp[left, 2] and kp[right, 2]:
            assert kp[left, 0] > kp[right, 0]  # facing the viewer: its left is on the image right
    assert seen == {0, 1, 2}


def test_semantic_masks_are_voc_style(raw):
    split_dir = raw["shapes_semantic"]["train"]
    assert json.loads((split_dir / "classes.json").read_text()) == SEMANTIC_CLASSES
    for mask_path in sorted((split_dir / "masks").glob("*.png")):
        pixels = _image(split_dir / "images" / mask_path.with_suffix(".jpg").name)
        with Image.open(mask_path) as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "P", (SIZE, SIZE))
            labels = np.asarray(mask)
        assert set(np.unique(labels)) <= {*range(len(SEMANTIC_CLASSES)), 255}
        foreground = (labels > 0) & (labels < 255)
        assert foreground.any()
        # A 255 band separates every object from the background, as in VOC.
        assert not (_filtered(foreground, 3, grow=True) & (labels == 0)).any()
        background = pixels[labels == 0].mean(axis=0)
        for class_id in np.unique(labels[foreground]):
            region = pixels[_filtered(labels == class_id, 3, grow=False)]
            assert len(region) and np.abs(region.mean(axis=0) - background).sum() > 20


def test_image_folder_has_every_class_in_every_split(raw):
    for split, split_dir in raw["shapes_classes"].items():
        for name in SHAPES:
            files = sorted((split_dir / name).glob("*.jpg"))
            assert files, f"{split}/{name} is empty"
            for path in files:
                _image(path)
