"""The demo shows partial annotation for real: the keypoint source's images hold shapes of
the instance source's classes that it does not annotate, and its labels do not change."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from data_pipelines.demo.synthetic import SHAPES


def test_keypoint_images_hold_unannotated_shapes_of_the_instance_classes(demo_sources):
    raw = demo_sources.parent / "raw"
    split_dir = raw / "shapes_keypoints" / "train"
    coco = json.loads((split_dir / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["figure"]  # the shapes are not its classes
    instance_classes = {c["name"] for c in json.loads((raw / "shapes_instances" / "train" / "annotations.json")
                                                    .read_text())["categories"]}
    unannotated = json.loads((split_dir / "unannotated.json").read_text())
    assert {u["name"] for u in unannotated} <= instance_classes == set(SHAPES)
    images = {i["id"]: i for i in coco["images"]}
    assert len({u["image_id"] for u in unannotated}) >= 0.75 * len(images)  # in most images
    drawn = 0
    for u in unannotated:
        image = images[u["image_id"]]
        pixels = np.asarray(Image.open(split_dir / "images" / image["file_name"]), dtype=float)
        x, y, w, h = u["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
        # The shape was drawn: the centre of its box stands out from just outside the box.
        cx, cy = int(x + w / 2), int(y + h / 2)
        centre = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
        x0, y0 = max(int(x) - 3, 0), max(int(y) - 3, 0)
        x1, y1 = min(int(x + w) + 3, image["width"] - 1), min(int(y + h) + 3, image["height"] - 1)
        outside = np.stack([pixels[y0, x0], pixels[y0, x1], pixels[y1, x0], pixels[y1, x1]]).mean(axis=0)
        drawn += np.abs(centre - outside).sum() > 60
    assert drawn >= 0.8 * len(unannotated), (drawn, len(unannotated))
