"""`polytask data convert yolo`: every box, polygon and keypoint of a small Ultralytics-format
set (written here) comes back from the shards through the real decoder; bad label lines
follow the bad-sample policy naming file and line; data.yaml cannot reach outside its
dataset directory."""
from __future__ import annotations

import argparse
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.bad_data import TooManyBadSamples
from data_pipelines.conversion import SKIPPED_NAME
from data_pipelines.conversion.coco import COCO_PERSON_KEYPOINTS, COCO_PERSON_SIGMAS
from data_pipelines.conversion.yolo import COCO_PERSON_FLIP_IDX, POSE_AREA_PER_BOX_AREA, convert_yolo
from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.decode import decode_sample
from launcher.data_cli import add_data_subcommands, run_data_command

# Image sizes are powers of two: pixel / size * size is exact in floats, so the expected
# pixel values below are what must come back, to the bit.
IMAGES = {  # relative path -> (width, height, format)
    "images/train/a.jpg": (64, 32, "JPEG"),
    "images/train/b.png": (32, 64, "PNG"),
    "images/train/sub/c.jpg": (32, 32, "JPEG"),
    "images/train/empty.jpg": (32, 32, "JPEG"),  # no label file: an image without objects
}
CLASSES = {0: "cat", 3: "dog"}  # a mapping with a gap, as data.yaml may hold

# Pixel-space objects per image: (class, box xywh) or (class, polygon [x1, y1, ...]).
BOXES = {
    "images/train/a.jpg": [(0, [4.0, 6.0, 20.0, 10.0]), (3, [40.0, 0.0, 24.0, 32.0])],
    "images/train/b.png": [(3, [2.0, 50.0, 8.0, 12.0])],
    "images/train/sub/c.jpg": [(0, [0.0, 0.0, 32.0, 32.0]), (0, [8.0, 8.0, 2.0, 4.0])],
}
POLYGONS = {
    "images/train/a.jpg": [(0, [2.0, 2.0, 30.0, 4.0, 20.0, 28.0]), (3, [40.0, 4.0, 60.0, 4.0, 60.0, 20.0, 44.0, 26.0])],
    "images/train/b.png": [(3, [1.0, 40.0, 31.0, 40.0, 16.0, 63.0])],
    "images/train/sub/c.jpg": [(0, [4.0, 4.0, 12.0, 4.0, 12.0, 12.0, 4.0, 12.0, 8.0, 10.0])],
}


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for rel, (width, height, fmt) in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / rel, format=fmt)


def _labels_file(root: Path, image_rel: str) -> Path:
    return (root / image_rel.replace("images/", "labels/", 1)).with_suffix(".txt")


def _write_labels(root: Path, lines: dict[str, list[str]]) -> None:
    for rel, rows in lines.items():
        path = _labels_file(root, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(row + "\n" for row in rows))


def _norm(values: list[float], width: int, height: int) -> list[float]:
    return [v / (width if i % 2 == 0 else height) for i, v in enumerate(values)]


def _box_line(class_id: int, box: list[float], width: int, height: int) -> str:
    x, y, w, h = box
    return " ".join(map(repr, [class_id, *_norm([x + w / 2, y + h / 2, w, h], width, height)]))


def _polygon_line(class_id: int, polygon: list[float], width: int, height: int) -> str:
    return " ".join(map(repr, [class_id, *_norm(polygon, width, height)]))


def _make_set(root: Path, objects: dict, line, **yaml_extra) -> Path:
    _write_images(root)
    _write_labels(root, {rel: [line(c, v, *IMAGES[rel][:2]) for c, v in objs] for rel, objs in objects.items()})
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": CLASSES, **yaml_extra}))
    return data_yaml


def _samples(manifest) -> dict[str, dict]:
    """Every shard sample, decoded by the real decoder, by the image's file name."""
    raw: dict[str, dict] = defaultdict(dict)
    for url in manifest.shard_urls():
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                raw[key] |= {"__key__": key, "__url__": url, ext: tar.extractfile(member).read()}
    space = build_label_space([manifest])
    decoded = {}
    for sample in raw.values():
        file_name = json.loads(sample["json"])["image"]["file_name"]
        decoded[file_name] = decode_sample(sample, manifest=manifest, label_space=space) | {
            "annotations": json.loads(sample["json"])["annotations"]}
    return decoded


def _xyxy(box: list[float]) -> list[float]:
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


def test_boxes_round_trip(tmp_path):
    data_yaml = _make_set(tmp_path / "ds", BOXES, _box_line)
    manifest = convert_yolo(data_yaml, tmp_path / "out", name="boxes", split="train", tasks=["detection"], workers=2)
    assert manifest.categories == [{"id": 0, "name": "cat"}, {"id": 3, "name": "dog"}]
    samples = _samples(load_manifest(tmp_path / "out"))
    assert sorted(samples) == sorted(IMAGES)
    space = build_label_space([manifest])
    for rel in IMAGES:
        objects = BOXES.get(rel, [])
        out = samples[rel]
        assert out["boxes"].tolist() == [_xyxy(box) for _, box in objects]
        assert out["labels"].tolist() == [space.category_to_index["boxes"][c] for c, _ in objects]
        assert [a["category_id"] for a in out["annotations"]] == [c for c, _ in objects]
        assert out["image"].shape[1:] == IMAGES[rel][1::-1]  # (H, W)


def test_polygons_round_trip_to_instance_masks(tmp_path):
    data_yaml = _make_set(tmp_path / "ds", POLYGONS, _polygon_line)
    convert_yolo(data_yaml, tmp_path / "out", name="segs", split="train", tasks=["detection", "instance_mask"])
    samples = _samples(load_manifest(tmp_path / "out"))
    assert sorted(samples) == sorted(IMAGES)
    for rel, (width, height, _) in IMAGES.items():
        objects = POLYGONS.get(rel, [])
        out = samples[rel]
        assert [a["segmentation"] for a in out["annotations"]] == [[polygon] for _, polygon in objects]
        # The box of a polygon is its extent.
        extents = [[min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])] for _, p in objects]
        assert out["boxes"].tolist() == extents
        assert out["masks"].shape == (len(objects), height, width)
        for mask, (_, polygon) in zip(out["masks"], objects):
            drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))
            assert drawn.sum() > 0 and np.array_equal(mask.numpy(), drawn)


def _pose_line(class_id: int, obj: tuple, width: int, height: int) -> str:
    box, points = obj
    x, y, w, h = box
    values = _norm([x + w / 2, y + h / 2, w, h], width, height)
    for px, py, v in points:
        values += [px / width, py / height, v]
    return " ".join(map(repr, [class_id, *values]))


def _person(seed: int, width: int, height: int) -> tuple:
    """A box and 17 keypoints with every visibility: 0 at (0, 0), as YOLO writes unlabelled ones."""
    rng = np.random.default_rng(seed)
    points = []
    for k in range(17):
        v = k % 3
        points.append((0.0, 0.0, v) if v == 0 else (float(rng.integers(1, width)), float(rng.integers(1, height)), v))
    return [2.0, 2.0, width - 4.0, height - 4.0], points


def test_pose_keypoints_round_trip(tmp_path):
    root = tmp_path / "ds"
    people = {rel: [(0, _person(i, *IMAGES[rel][:2])), (0, _person(10 + i, *IMAGES[rel][:2]))]
              for i, rel in enumerate(sorted(IMAGES)) if "empty" not in rel}
    data_yaml = _make_set(root, people, _pose_line, names=["person"], kpt_shape=[17, 3],
                          flip_idx=list(COCO_PERSON_FLIP_IDX))
    # The validation split as a .txt list of images, relative to the list's directory.
    (root / "val.txt").write_text("./images/train/a.jpg\nimages/train/sub/c.jpg\n")
    data_yaml.write_text(data_yaml.read_text() + "val: val.txt\n")

    manifest = convert_yolo(data_yaml, tmp_path / "out", name="pose", split="train", tasks=["detection", "keypoints"])
    assert manifest.keypoints.names == list(COCO_PERSON_KEYPOINTS)
    assert manifest.keypoints.sigmas == list(COCO_PERSON_SIGMAS)
    assert manifest.keypoints.flip_permutation() == list(COCO_PERSON_FLIP_IDX)
    samples = _samples(load_manifest(tmp_path / "out"))
    assert sorted(samples) == sorted(IMAGES)
    for rel in IMAGES:
        objects = people.get(rel, [])
        out = samples[rel]
        assert out["boxes"].tolist() == [_xyxy(box) for _, (box, _) in objects]
        assert out["keypoints"].tolist() == [[[x, y] for x, y, _ in points] for _, (_, points) in objects]
        assert out["keypoint_visibility"].tolist() == [[v for *_, v in points] for _, (_, points) in objects]
        # OKS is scaled by the object's area; YOLO has no segment, so Ultralytics' box-area factor.
        assert [a["area"] for a in out["annotations"]] == [
            pytest.approx(box[2] * box[3] * POSE_AREA_PER_BOX_AREA) for _, (box, _) in objects]

    # The ground truth evaluation scores against: the same objects score AP 1 against themselves.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(Path(manifest.annotation_path())))
    results = [{k: a[k] for k in ("image_id", "category_id", "bbox", "keypoints")} | {"score": 1.0}
               for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(results), "keypoints")
    evaluator.params.kpt_oks_sigmas = np.array(manifest.keypoints.sigmas)
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)

    val = convert_yolo(data_yaml, tmp_path / "val", name="pose", split="val", tasks=["keypoints"])
    assert sorted(_samples(val)) == ["images/train/a.jpg", "images/train/sub/c.jpg"]


def test_two_value_keypoints_at_the_origin_are_unlabelled(tmp_path):
    root = tmp_path / "ds"
    _write_images(root)
    # 64x32 image: (16, 8) visible, (0, 0) unlabelled.
    _write_labels(root, {"images/train/a.jpg": ["0 0.5 0.5 0.5 0.5 0.25 0.25 0 0"]})
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"train": "images/train", "names": ["thing"], "kpt_shape": [2, 2], "flip_idx": [1, 0]}))
    manifest = convert_yolo(root / "data.yaml", tmp_path / "out", name="kp2", split="train",
                            tasks=["detection", "keypoints"], keypoint_sigmas=[0.1, 0.1])
    assert manifest.keypoints.flip_map == [["kpt_0", "kpt_1"]]
    out = _samples(manifest)["images/train/a.jpg"]
    assert out["keypoints"].tolist() == [[[16.0, 8.0], [0.0, 0.0]]]
    assert out["keypoint_visibility"].tolist() == [[2, 0]]


BAD_LINES = {
    "too_few_values": ("0 0.5 0.5 0.2", "4 values; a line is a box"),
    "outside_unit_range": ("0 0.5 0.5 1.5 0.2", "outside [0, 1]"),
    "unknown_class": ("7 0.5 0.5 0.2 0.2", "class '7' is not one of data.yaml's class ids [0, 3]"),
    "not_numbers": ("0 a b c d", "is not a list of numbers"),
    "two_point_polygon": ("0 0.1 0.1 0.2 0.2 0.3", "6 values"),
}


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_label_line_raises_or_is_skipped_naming_file_and_line(tmp_path, case, policy):
    line, problem = BAD_LINES[case]
    root = tmp_path / "ds"
    data_yaml = _make_set(root, BOXES, _box_line)
    labels = _labels_file(root, "images/train/b.png")
    labels.write_text(labels.read_text() + line + "\n")  # line 2
    where = f"{labels.resolve()}:2"
    if policy == "raise":
        with pytest.raises(ValueError, match="^" + ".*".join(map(_escape, [where, problem]))):
            convert_yolo(data_yaml, tmp_path / "out", name="bad", split="train", tasks=["detection"])
        assert not (tmp_path / "out").exists()  # nothing written
        return
    manifest = convert_yolo(data_yaml, tmp_path / "out", name="bad", split="train", tasks=["detection"],
                            bad_sample_policy="skip", max_bad_fraction=0.5)
    assert sorted(_samples(manifest)) == sorted(set(IMAGES) - {"images/train/b.png"})
    skipped = json.loads((tmp_path / "out" / SKIPPED_NAME).read_text())["skipped"]
    assert [s["record"] for s in skipped] == [str((root / "images/train/b.png").resolve())]
    assert where in skipped[0]["problems"][0] and problem in skipped[0]["problems"][0]
    with pytest.raises(TooManyBadSamples):  # 1 of 4 images
        convert_yolo(data_yaml, tmp_path / "out2", name="bad", split="train", tasks=["detection"],
                     bad_sample_policy="skip", max_bad_fraction=0.2)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_instance_masks_need_polygons_and_keypoints_need_kpt_shape(tmp_path):
    data_yaml = _make_set(tmp_path / "ds", BOXES, _box_line)
    with pytest.raises(ValueError, match=r"a\.txt:1: a box line .* the source labels instance_mask"):
        convert_yolo(data_yaml, tmp_path / "out", name="x", split="train", tasks=["detection", "instance_mask"])
    with pytest.raises(ValueError, match="tasks include 'keypoints' but data.yaml has no kpt_shape"):
        convert_yolo(data_yaml, tmp_path / "out", name="x", split="train", tasks=["keypoints"])
    with pytest.raises(ValueError, match="no split 'test'; it lists \\['train'\\]"):
        convert_yolo(data_yaml, tmp_path / "out", name="x", split="test", tasks=["detection"])


def test_data_yaml_cannot_reach_outside_its_directory_unless_the_user_names_the_root(tmp_path):
    outside = tmp_path / "elsewhere"
    _make_set(outside, BOXES, _box_line)
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "data.yaml").write_text(
        yaml.safe_dump({"path": "../elsewhere", "train": "images/train", "names": CLASSES}))
    with pytest.raises(ValueError, match="path '../elsewhere' leads out of the dataset directory .* give --root"):
        convert_yolo(config / "data.yaml", tmp_path / "out", name="x", split="train", tasks=["detection"])
    manifest = convert_yolo(config / "data.yaml", tmp_path / "out", name="x", split="train", tasks=["detection"],
                            root=outside)  # named by the user: read
    assert manifest.num_samples == len(IMAGES)

    # Inside the dataset directory, a split may not point out of it either, directly or by a list.
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    (outside / "data.yaml").write_text(yaml.safe_dump({"train": "../secret.jpg", "names": CLASSES}))
    with pytest.raises(ValueError, match="train: '../secret.jpg'.* lies outside the dataset root"):
        convert_yolo(outside / "data.yaml", tmp_path / "o2", name="x", split="train", tasks=["detection"])
    (outside / "list.txt").write_text(f"images/train/a.jpg\n{secret}\n")
    (outside / "data.yaml").write_text(yaml.safe_dump({"train": "list.txt", "names": CLASSES}))
    with pytest.raises(ValueError, match=f"list.txt:2: {secret} lies outside the dataset root"):
        convert_yolo(outside / "data.yaml", tmp_path / "o3", name="x", split="train", tasks=["detection"])
    (outside / "images" / "train" / "link.jpg").symlink_to(secret)
    (outside / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": CLASSES}))
    with pytest.raises(ValueError, match="link.jpg lies outside the dataset root"):
        convert_yolo(outside / "data.yaml", tmp_path / "o4", name="x", split="train", tasks=["detection"])
    assert not any((tmp_path / d).exists() for d in ("o2", "o3", "o4"))


def test_cli_convert_yolo(tmp_path, capsys):
    data_yaml = _make_set(tmp_path / "ds", POLYGONS, _polygon_line)
    parser = argparse.ArgumentParser(prog="polytask data")
    add_data_subcommands(parser.add_subparsers(dest="data_command", required=True))

    def cli(*argv: str) -> int:
        return run_data_command(parser.parse_args(["convert", "yolo", *argv]))

    args = ["--data", str(data_yaml), "--split", "train", "--out", str(tmp_path / "out"), "--name", "segs"]
    assert cli(*args, "--tasks", "detection", "instance_mask") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.tasks == ["detection", "instance_mask"] and manifest.num_samples == len(IMAGES)
    assert cli(*args, "--tasks", "keypoints") == 1
    assert f"polytask data: error: {data_yaml}: tasks include 'keypoints' but data.yaml has no kpt_shape" in (
        capsys.readouterr().err)
    torch.testing.assert_close(  # what the CLI wrote decodes as the library's does
        _samples(manifest)["images/train/b.png"]["masks"].float().sum(), torch.tensor(float(
            mask_utils.area(mask_utils.frPyObjects([POLYGONS["images/train/b.png"][0][1]], 64, 32))[0])))
