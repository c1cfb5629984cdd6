"""Converters: everything in a native source comes back from the shards unchanged."""
from __future__ import annotations

import argparse
import json
import os
import re
import tarfile
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from data_pipelines.bad_data import TooManyBadSamples
from data_pipelines.conversion import (
    COCO_PERSON_KEYPOINTS,
    COCO_PERSON_SIGMAS,
    DEFAULT_KEYPOINT_SIGMA,
    GROUND_TRUTH_NAME,
    SKIPPED_NAME,
    convert_coco,
    convert_image_folder,
    convert_semantic,
)
from data_pipelines.demo.shards import convert_demo
from launcher.data_cli import add_data_subcommands, run_data_command
from data_pipelines.manifest import MANIFEST_NAME, load_manifest
from data_pipelines.demo.synthetic import (
    DEMO_TASKS,
    KEYPOINT_FLIP_MAP,
    KEYPOINT_SIGMAS,
    SEMANTIC_CLASSES,
    SHAPES,
    generate_demo_data,
)

NUM_IMAGES = {"train": 10, "val": 3}

# Hand-made COCO: 16x12 images; the crowd region is rows 2-5 x columns 3-6.
TINY_H, TINY_W = 12, 16
TINY_CROWD = np.zeros((TINY_H, TINY_W), dtype=np.uint8)
TINY_CROWD[2:6, 3:7] = 1
# Uncompressed RLE written out by hand: runs go down the columns, starting with zeros.
TINY_CROWD_COUNTS = [3 * 12 + 2, 4, 8, 4, 8, 4, 8, 4, 6 + 9 * 12]
TINY_BLOB = np.zeros((TINY_H, TINY_W), dtype=np.uint8)
TINY_BLOB[6:11, 8:15] = 1
TINY_POLYGON = [1.0, 1.0, 9.0, 1.0, 9.0, 7.0, 1.0, 7.0]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return generate_demo_data(tmp_path_factory.mktemp("raw"), seed=3, num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory) -> tuple[Path, Path]:
    """Polygon, compressed RLE, uncompressed-RLE crowd, non-contiguous ids, one empty image, a PNG."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    for name, fmt in (("a.jpg", "JPEG"), ("sub/b.png", "PNG"), ("c.jpg", "JPEG")):
        pixels = rng.integers(0, 256, (TINY_H, TINY_W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / name, format=fmt)
    blob = mask_utils.encode(np.asfortranarray(TINY_BLOB))
    coco = {
        "images": [
            {"id": 42, "file_name": "a.jpg", "width": TINY_W, "height": TINY_H, "license": 3},
            {"id": 7, "file_name": "sub/b.png", "width": TINY_W, "height": TINY_H},
            {"id": 1000, "file_name": "c.jpg", "width": TINY_W, "height": TINY_H},  # no annotations
        ],
        "annotations": [
            {"id": 5, "image_id": 42, "category_id": 11, "bbox": [1.0, 1.0, 8.0, 6.0], "area": 48.0,
             "iscrowd": 0, "segmentation": [TINY_POLYGON]},
            {"id": 9, "image_id": 42, "category_id": 2, "bbox": [8.0, 6.0, 7.0, 5.0], "area": 35.0, "iscrowd": 0,
             "segmentation": {"size": [TINY_H, TINY_W], "counts": blob["counts"].decode("utf-8")}},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [3.0, 2.0, 4.0, 4.0], "area": 16.0, "iscrowd": 1,
             "segmentation": {"size": [TINY_H, TINY_W], "counts": TINY_CROWD_COUNTS}},
        ],
        "categories": [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 11, "name": "zebra"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    return root / "images", root / "annotations.json"


def _coco_source(name: str, raw, tiny_coco) -> tuple[Path, Path, list[str]]:
    if name == "tiny":
        return (*tiny_coco, ["detection", "instance_mask"])
    split_dir = raw[name]["train"]
    return split_dir / "images", split_dir / "annotations.json", DEMO_TASKS[name]


def _read_tarfile(urls: list[str]) -> tuple[dict[str, dict[str, bytes]], list[int]]:
    """Samples by key, and the number of samples in each tar, read with the tarfile module."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    counts = []
    for url in urls:
        with tarfile.open(url) as tar:
            keys = set()
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
                keys.add(key)
            counts.append(len(keys))
    return dict(samples), counts


def _read_webdataset(urls: list[str]) -> dict[str, dict[str, bytes]]:
    return {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in wds.WebDataset(urls, shardshuffle=False)
    }


def _read_back(manifest) -> dict[str, dict[str, bytes]]:
    """Read every shard both ways; both must agree, and so must the manifest's counts."""
    urls = manifest.shard_urls()
    samples, counts = _read_tarfile(urls)
    assert _read_webdataset(urls) == samples
    assert counts == [s.num_samples for s in manifest.shards]
    assert [Path(u).stat().st_size for u in urls] == [s.num_bytes for s in manifest.shards]
    assert load_manifest(manifest.root).to_json() == manifest.to_json()
    # Nothing else is left in the directory: no temporary files.
    expected_files = [MANIFEST_NAME, *(s.path for s in manifest.shards), *filter(None, [manifest.annotation_file])]
    assert sorted(p.name for p in Path(manifest.root).iterdir()) == sorted(expected_files)
    return samples


def _decode(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list) or isinstance(segmentation["counts"], list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
    return mask_utils.decode(segmentation)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["shapes_instances", "shapes_keypoints", "tiny"])
def test_coco_round_trip_keeps_every_image_and_annotation(source, raw, tiny_coco, tmp_path):
    images_dir, annotation_file, tasks = _coco_source(source, raw, tiny_coco)
    coco = json.loads(annotation_file.read_text())
    manifest = convert_coco(
        images_dir, annotation_file, tmp_path, name=source, tasks=tasks, shard_max_samples=3, workers=2
    )

    samples = _read_back(manifest)
    assert len(manifest.shards) > 1 or source == "tiny"
    assert manifest.num_samples == len(coco["images"]) == len(samples)
    # The ground truth is copied into the source, byte for byte, and named relative to it.
    assert manifest.annotation_file == GROUND_TRUTH_NAME
    assert (tmp_path / GROUND_TRUTH_NAME).read_bytes() == annotation_file.read_bytes()
    assert manifest.categories == [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    by_file = {json.loads(s["json"])["image"]["file_name"]: s for s in samples.values()}
    for image in coco["images"]:
        sample = by_file[image["file_name"]]
        payload = json.loads(sample["json"])
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert payload == {"image": image, "annotations": annotations}
        ext = "png" if image["file_name"].endswith(".png") else "jpg"
        assert sample[ext] == (images_dir / image["file_name"]).read_bytes()
        for ann in payload["annotations"]:
            original = next(a for a in coco["annotations"] if a["id"] == ann["id"])
            h, w = image["height"], image["width"]
            np.testing.assert_array_equal(_decode(ann["segmentation"], h, w), _decode(original["segmentation"], h, w))


def test_tiny_coco_masks_decode_to_the_drawn_masks(tiny_coco, tmp_path):
    manifest = convert_coco(*tiny_coco, tmp_path, name="tiny", tasks=["detection", "instance_mask"])
    anns = {a["id"]: a for s in _read_back(manifest).values() for a in json.loads(s["json"])["annotations"]}
    polygon = np.zeros((TINY_H, TINY_W), dtype=np.uint8)
    polygon[1:7, 1:9] = 1  # the rectangle [1, 9] x [1, 7], as pycocotools rasterizes it
    np.testing.assert_array_equal(_decode(anns[5]["segmentation"], TINY_H, TINY_W), polygon)
    np.testing.assert_array_equal(_decode(anns[9]["segmentation"], TINY_H, TINY_W), TINY_BLOB)
    np.testing.assert_array_equal(_decode(anns[3]["segmentation"], TINY_H, TINY_W), TINY_CROWD)
    assert anns[3]["iscrowd"] == 1


def test_keypoint_schema_from_category_extras_or_defaults(raw, tiny_coco, tmp_path):
    images_dir, annotation_file, tasks = _coco_source("shapes_keypoints", raw, tiny_coco)
    schema = convert_coco(images_dir, annotation_file, tmp_path / "demo", name="kp", tasks=tasks).keypoints
    assert schema.flip_map == KEYPOINT_FLIP_MAP and schema.sigmas == KEYPOINT_SIGMAS

    # A plain COCO keypoint category: flip pairs from left_/right_ names, default sigmas.
    coco = json.loads(tiny_coco[1].read_text())
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    coco["categories"] = [{"id": 1, "name": "person", "keypoints": names, "skeleton": [[1, 2], [1, 3]]}]
    coco["annotations"] = [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0,
                            "keypoints": [3, 3, 2, 2, 2, 2, 4, 2, 1, 0, 0, 0, 5, 2, 2], "num_keypoints": 4}]
    plain = tmp_path / "person.json"
    plain.write_text(json.dumps(coco))
    schema = convert_coco(tiny_coco[0], plain, tmp_path / "plain", name="person", tasks=["keypoints"]).keypoints
    assert schema.names == names and schema.skeleton == [[1, 2], [1, 3]]
    assert schema.flip_map == [["left_eye", "right_eye"], ["left_ear", "right_ear"]]
    assert schema.sigmas == [DEFAULT_KEYPOINT_SIGMA] * len(names)


def _person_json(tiny_coco, path: Path, names: list[str], **category_extras) -> Path:
    """The tiny COCO json with one keypoint category named ``names`` and one annotation."""
    coco = json.loads(tiny_coco[1].read_text())
    coco["categories"] = [{"id": 1, "name": "person", "keypoints": names, **category_extras}]
    coco["annotations"] = [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                            "iscrowd": 0, "keypoints": [3, 3, 2] * len(names), "num_keypoints": len(names)}]
    path.write_text(json.dumps(coco))
    return path


def _sigmas(tiny_coco, annotation_file: Path, out: Path, **options) -> list[float]:
    convert_coco(tiny_coco[0], annotation_file, out, name="person", tasks=["keypoints"], **options)
    return load_manifest(out).keypoints.sigmas


def test_keypoint_sigmas_coco_person_option_category_or_a_warned_default(tiny_coco, tmp_path, caplog):
    coco_names = list(COCO_PERSON_KEYPOINTS)
    person = _person_json(tiny_coco, tmp_path / "person.json", coco_names)  # as COCO ships it: no sigmas
    with caplog.at_level("WARNING"):
        # COCO's 17 keypoints: pycocotools' own default sigmas, bit for bit.
        pycocotools_default = COCOeval(iouType="keypoints").params.kpt_oks_sigmas.tolist()
        assert _sigmas(tiny_coco, person, tmp_path / "coco") == list(COCO_PERSON_SIGMAS) == pycocotools_default
        assert (COCO_PERSON_SIGMAS[1], max(COCO_PERSON_SIGMAS)) == pytest.approx((0.025, 0.107))  # eyes, hips
        assert not caplog.records
        # An explicit option goes first, then the category's own.
        given = [0.1 + i / 100 for i in range(17)]
        assert _sigmas(tiny_coco, person, tmp_path / "option", keypoint_sigmas=given) == given
        own = _person_json(tiny_coco, tmp_path / "own.json", coco_names, sigmas=[0.07] * 17)
        assert _sigmas(tiny_coco, own, tmp_path / "own") == [0.07] * 17
        assert not caplog.records
        # The same names in another order are not COCO's layout: the default, warned once, naming the source.
        shuffled = _person_json(tiny_coco, tmp_path / "shuffled.json", coco_names[::-1])
        assert _sigmas(tiny_coco, shuffled, tmp_path / "shuffled") == [DEFAULT_KEYPOINT_SIGMA] * 17
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'person'" in warnings[0] and str(shuffled) in warnings[0], warnings


@pytest.mark.parametrize(
    "sigmas, problem",
    [
        ("0.1,0.2", r"gives 2 value\(s\) for 17 keypoints"),
        (",".join(["0.05"] * 16 + ["nan"]), r"\[16\] is nan"),
        (",".join(["0.05"] * 16 + ["0"]), r"\[16\] is 0.0; each sigma must be a finite number > 0"),
        (",".join(["0.05", "-0.05"] + ["0.05"] * 15), r"\[1\] is -0.05"),
    ],
)
def test_cli_keypoint_sigmas_are_checked(tiny_coco, tmp_path, capsys, sigmas, problem):
    person = _person_json(tiny_coco, tmp_path / "person.json", list(COCO_PERSON_KEYPOINTS))
    args = ["convert", "coco", "--images", str(tiny_coco[0]), "--annotations", str(person), "--tasks", "keypoints",
            "--out", str(tmp_path / "out"), "--name", "person", "--keypoint-sigmas", sigmas]
    assert _cli(args) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(person))}: --keypoint-sigmas {problem}", err), err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_cli_keypoint_sigmas_reach_the_manifest_and_are_refused_when_ignored(tiny_coco, tmp_path, capsys):
    person = _person_json(tiny_coco, tmp_path / "person.json", ["nose", "left_eye", "right_eye"])
    args = ["convert", "coco", "--images", str(tiny_coco[0]), "--annotations", str(person),
            "--out", str(tmp_path / "out"), "--name", "person", "--keypoint-sigmas", "0.026,0.025,0.025"]
    assert _cli([*args, "--tasks", "keypoints"]) == 0
    assert load_manifest(tmp_path / "out").keypoints.sigmas == [0.026, 0.025, 0.025]
    assert _cli([*args, "--tasks", "detection"]) == 1  # no keypoint AP to use them for
    assert "--keypoint-sigmas given, but the tasks ['detection'] exclude 'keypoints'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli([*args[:-1], "0.1,x", "--tasks", "keypoints"])
    assert "not a comma-separated list of numbers" in capsys.readouterr().err


def test_a_converted_source_is_self_contained(tiny_coco, tmp_path):
    convert_coco(*tiny_coco, tmp_path / "src", name="tiny", tasks=["detection"])
    os.replace(tmp_path / "src", tmp_path / "moved")
    manifest = load_manifest(tmp_path / "moved")
    assert manifest.annotation_path() == str(tmp_path / "moved" / GROUND_TRUTH_NAME)
    assert Path(manifest.annotation_path()).read_bytes() == tiny_coco[1].read_bytes()


def test_semantic_round_trip_keeps_png_bytes(raw, tmp_path):
    split_dir = raw["shapes_semantic"]["train"]
    manifest = convert_semantic(
        split_dir / "images", split_dir / "masks", tmp_path, name="sem", classes=SEMANTIC_CLASSES, shard_max_samples=4
    )
    samples = _read_back(manifest)
    assert manifest.semantic_classes == SEMANTIC_CLASSES and manifest.tasks == ["semantic"]
    masks = sorted((split_dir / "masks").glob("*.png"))
    assert len(samples) == len(masks) == NUM_IMAGES["train"]
    for mask_path in masks:
        sample = samples[mask_path.stem]
        assert sample["seg.png"] == mask_path.read_bytes()
        assert sample["jpg"] == (split_dir / "images" / f"{mask_path.stem}.jpg").read_bytes()
        image = json.loads(sample["json"])["image"]
        assert (image["file_name"], image["width"], image["height"]) == (f"{mask_path.stem}.jpg", 128, 128)


def test_image_folder_class_ids_match_folder_names(raw, tmp_path):
    root = raw["shapes_classes"]["train"]
    manifest = convert_image_folder(root, tmp_path, name="cls", shard_max_samples=4)
    samples = _read_back(manifest)
    assert manifest.classes == sorted(SHAPES)
    assert len(samples) == len(list(root.glob("*/*.jpg")))
    for sample in samples.values():
        payload = json.loads(sample["json"])
        folder = payload["image"]["file_name"].split("/")[0]
        assert manifest.classes[payload["class_id"]] == folder
        assert sample["jpg"] == (root / payload["image"]["file_name"]).read_bytes()


def test_convert_demo_writes_every_split_and_source(raw, tmp_path):
    manifests = convert_demo(raw, tmp_path, workers=2)
    assert list(manifests) == list(NUM_IMAGES)
    for split, sources in manifests.items():
        assert list(sources) == list(DEMO_TASKS)
        for source, manifest in sources.items():
            assert Path(manifest.root) == tmp_path / split / source
            assert manifest.tasks == DEMO_TASKS[source] and manifest.name == source
            assert len(_read_back(manifest)) == manifest.num_samples == NUM_IMAGES[split]


# --- determinism --------------------------------------------------------------------------


def test_output_is_byte_identical_across_runs_and_worker_counts(raw, tiny_coco, tmp_path):
    split_dir = raw["shapes_instances"]["train"]
    for workers in (1, 4):
        out = tmp_path / f"w{workers}"
        convert_coco(split_dir / "images", split_dir / "annotations.json", out / "inst", name="inst",
                     tasks=["detection"], shard_max_samples=2, workers=workers)
        convert_coco(*tiny_coco, out / "tiny", name="tiny", tasks=["detection"], shard_max_samples=1, workers=workers)
        convert_image_folder(raw["shapes_classes"]["val"], out / "cls", name="cls", shard_max_bytes=1, workers=workers)
    serial, parallel = _tree(tmp_path / "w1"), _tree(tmp_path / "w4")
    assert serial == parallel
    assert len([p for p in serial if p.startswith("inst/") and p.endswith(".tar")]) == 5
    assert len([p for p in serial if p.startswith("cls/") and p.endswith(".tar")]) == NUM_IMAGES["val"]


# --- bad input ----------------------------------------------------------------------------
# Each case builds a broken source under tmp_path and returns a _Rejected: the conversion to
# run (given the out dir), the error it must raise, and what the message must name. The bad
# file sorts last and shards hold one sample, so writing before checking would leave shards.


class _Rejected(NamedTuple):
    convert: Callable[[Path], object]
    error: type[Exception]
    names: list[str]


def _copy_tree(src: Path, dst: Path) -> Path:
    for path in src.rglob("*"):
        if path.is_file():
            (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / path.relative_to(src)).write_bytes(path.read_bytes())
    return dst


def _coco_case(edit, *names: str):
    """A copy of the tiny COCO json changed by ``edit``; the message names the json and ``names``."""

    def case(raw, tiny_coco, tmp_path) -> _Rejected:
        coco = json.loads(tiny_coco[1].read_text())
        edit(coco)
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(coco))
        return _Rejected(partial(_to_coco, tiny_coco[0], path), ValueError, [str(path), *names])

    return case


def _to_coco(images: Path, annotation_file: Path, out: Path):
    return convert_coco(images, annotation_file, out, name="x", tasks=["detection"], shard_max_samples=1)


def _to_semantic(images: Path, masks: Path, out: Path, classes: list[str] = SEMANTIC_CLASSES):
    return convert_semantic(images, masks, out, name="x", classes=classes, shard_max_samples=1)


def _missing_coco_images_dir(raw, tiny_coco, tmp_path) -> _Rejected:
    missing = tmp_path / "no_such_dir"
    return _Rejected(partial(_to_coco, missing, tiny_coco[1]), FileNotFoundError, [str(missing)])


def _missing_masks_dir(raw, tiny_coco, tmp_path) -> _Rejected:
    missing, images = tmp_path / "no_masks", raw["shapes_semantic"]["val"] / "images"
    return _Rejected(partial(_to_semantic, images, missing), FileNotFoundError, [str(missing)])


def _missing_image_folder(raw, tiny_coco, tmp_path) -> _Rejected:
    missing = tmp_path / "no_root"
    return _Rejected(partial(convert_image_folder, missing, name="x"), FileNotFoundError, [str(missing)])


def _missing_image_file(raw, tiny_coco, tmp_path) -> _Rejected:
    images = _copy_tree(tiny_coco[0], tmp_path / "images")
    (images / "c.jpg").unlink()
    return _Rejected(partial(_to_coco, images, tiny_coco[1]), FileNotFoundError, [str(images / "c.jpg")])


def _undecodable_image(raw, tiny_coco, tmp_path) -> _Rejected:
    images = _copy_tree(tiny_coco[0], tmp_path / "images")
    (images / "c.jpg").write_bytes(b"this is not a jpeg")
    return _Rejected(partial(_to_coco, images, tiny_coco[1]), ValueError, [str(images / "c.jpg")])


def _truncated_image(raw, tiny_coco, tmp_path) -> _Rejected:
    root = _copy_tree(raw["shapes_classes"]["val"], tmp_path / "folder")
    last = sorted(root.rglob("*.jpg"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return _Rejected(partial(convert_image_folder, root, name="x", shard_max_samples=1), ValueError, [str(last)])


def _broken_mask(mask: Image.Image | None, *names: str, classes: list[str] = SEMANTIC_CLASSES):
    """A copy of the demo semantic source whose last mask is replaced by ``mask`` (when given)."""

    def case(raw, tiny_coco, tmp_path) -> _Rejected:
        split_dir = _copy_tree(raw["shapes_semantic"]["val"], tmp_path / "semantic")
        last = sorted((split_dir / "masks").iterdir())[-1]
        if mask is not None:
            mask.save(last)
        convert = partial(_to_semantic, split_dir / "images", split_dir / "masks", classes=classes)
        return _Rejected(convert, ValueError, [str(last) if mask is not None else str(split_dir / "masks"), *names])

    return case


def _drop(key: str):
    return lambda coco: coco["annotations"][1].pop(key)


BAD_INPUTS = {
    "missing COCO images dir": _missing_coco_images_dir,
    "missing masks dir": _missing_masks_dir,
    "missing image folder": _missing_image_folder,
    "json without images": _coco_case(lambda coco: coco.pop("images"), "images"),
    "json without annotations": _coco_case(lambda coco: coco.pop("annotations"), "annotations"),
    "annotations null": _coco_case(lambda coco: coco.update(annotations=None), "'annotations' is null, expected a list"),
    "annotation without bbox": _coco_case(_drop("bbox"), "annotation id 9", "bbox"),
    "annotation without category_id": _coco_case(_drop("category_id"), "annotation id 9", "category_id"),
    "annotation without image_id": _coco_case(_drop("image_id"), "annotation id 9", "image_id"),
    "annotation of unknown image": _coco_case(
        lambda coco: coco["annotations"][2].update(image_id=8), "annotation id 3", "image id 8"
    ),
    "missing image file": _missing_image_file,
    "undecodable image": _undecodable_image,
    "truncated image": _truncated_image,
    "mask of wrong size": _broken_mask(Image.new("L", (64, 128)), "64x128"),
    "mask with three channels": _broken_mask(Image.new("RGB", (128, 128)), "RGB"),
    "mask with unknown class": _broken_mask(None, "(< 2)", classes=SEMANTIC_CLASSES[:2]),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_naming_the_file_before_writing(case, raw, tiny_coco, tmp_path):
    convert, error, names = case(raw, tiny_coco, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        convert(out)
    for name in names:
        assert name in str(info.value)
    assert not out.exists() or not any(out.iterdir())


# --- bad input under policy skip --------------------------------------------------------------
# The tiny COCO source has images 42 (a.jpg, annotations 5 and 9), 7 (sub/b.png, annotation 3)
# and 1000 (c.jpg, none). Each case breaks it once and names the record skip leaves out.


def _corrupt_jpeg(images: Path, coco: dict) -> None:
    (images / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg after all")


def _image_entry_lacking_keys(images: Path, coco: dict) -> None:
    del coco["images"][1]["width"]


SKIP_CASES = {
    # case: (break the source, the record left out, what its problem names, image ids kept)
    "corrupt jpeg": (_corrupt_jpeg, "image id 1000 (c.jpg)", "c.jpg: not a decodable image", [42, 7]),
    "annotation missing keys": (lambda images, coco: coco["annotations"][1].pop("bbox"), "image id 42 (a.jpg)",
                                "annotation id 9 lacks ['bbox']", [7, 1000]),
    "image entry missing keys": (_image_entry_lacking_keys, "image entry #1", "image 7 lacks ['width']", [42, 1000]),
    "annotation of no image": (lambda images, coco: coco["annotations"][2].update(image_id=8), "annotation id 3",
                               "refers to image id 8", [42, 7, 1000]),
    # What the decoder would reject (or crash on) later, found before anything is written.
    "nan bbox": (lambda images, coco: coco["annotations"][1].update(bbox=[float("nan"), 6.0, 7.0, 5.0]),
                 "image id 42 (a.jpg)", "annotation id 9: bbox [nan, 6.0, 7.0, 5.0] has a non-finite", [7, 1000]),
    "negative bbox": (lambda images, coco: coco["annotations"][2].update(bbox=[3.0, 2.0, -4.0, 4.0]),
                      "image id 7 (sub/b.png)", "annotation id 3: bbox [3.0, 2.0, -4.0, 4.0] has a negative size",
                      [42, 1000]),
    "two-point polygon": (lambda images, coco: coco["annotations"][0].update(segmentation=[[1.0, 1.0, 9.0, 7.0]]),
                          "image id 42 (a.jpg)", "annotation id 5: segmentation polygon 0 has 4 values", [7, 1000]),
    "category_id a list": (lambda images, coco: coco["annotations"][2].update(category_id=[5]),
                           "image id 7 (sub/b.png)", "annotation id 3: category_id [5] is not an integer", [42, 1000]),
}


def _broken_coco(tiny_coco, tmp_path, case: str) -> tuple[Path, Path]:
    images = _copy_tree(tiny_coco[0], tmp_path / "images")
    coco = json.loads(tiny_coco[1].read_text())
    SKIP_CASES[case][0](images, coco)
    (tmp_path / "edited.json").write_text(json.dumps(coco))
    return images, tmp_path / "edited.json"


@pytest.mark.parametrize("case", SKIP_CASES)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_bad_record_raises_or_is_skipped_and_listed(tiny_coco, tmp_path, case, policy):
    images, annotations = _broken_coco(tiny_coco, tmp_path, case)
    _, record, problem, kept = SKIP_CASES[case]
    out = tmp_path / "out"
    convert = partial(convert_coco, images, annotations, out, name="x", tasks=["detection", "instance_mask"],
                      shard_max_samples=1, bad_sample_policy=policy, max_bad_fraction=0.4)
    if policy == "raise":  # the default: the first problem stops the conversion, nothing written
        with pytest.raises(ValueError, match=re.escape(problem)):
            convert()
        assert not out.exists() or not any(out.iterdir())
        return
    manifest = convert()
    samples = _read_back_with_skipped(manifest)
    assert sorted(json.loads(s["json"])["image"]["id"] for s in samples.values()) == sorted(kept)
    for sample in samples.values():  # kept images keep all their annotations
        meta = json.loads(sample["json"])
        original = [a for a in json.loads(tiny_coco[1].read_text())["annotations"]
                    if a["image_id"] == meta["image"]["id"] and not (case == "annotation of no image" and a["id"] == 3)]
        assert meta["annotations"] == original
    skipped = json.loads((out / SKIPPED_NAME).read_text())
    records = 4 if case == "annotation of no image" else 3  # images, and annotations that name none
    assert skipped["records"] == records and skipped["policy"] == "skip"
    assert [r["record"] for r in skipped["skipped"]] == [record]
    [message] = skipped["skipped"][0]["problems"]
    # The problem names the file: the image, or the json and the annotation or image entry.
    assert problem in message and str(images / "c.jpg" if case == "corrupt jpeg" else annotations) in message


@pytest.mark.parametrize("options, field", [({"bad_sample_policy": "ignore"}, "bad_sample_policy"),
                                            ({"max_bad_fraction": 1.0}, "max_bad_fraction")])
def test_policy_options_are_checked(tiny_coco, tmp_path, options, field):
    with pytest.raises(ValueError, match=f"convert.{field}"):
        convert_coco(*tiny_coco, tmp_path, name="x", tasks=["detection"], **options)


def _read_back_with_skipped(manifest) -> dict[str, dict[str, bytes]]:
    skipped = Path(manifest.root) / SKIPPED_NAME
    body = skipped.read_bytes()
    skipped.unlink()  # _read_back allows only the manifest and shards
    try:
        return _read_back(manifest)
    finally:
        skipped.write_bytes(body)


def test_skip_fails_past_max_bad_fraction_before_writing(tiny_coco, tmp_path):
    images, annotations = _broken_coco(tiny_coco, tmp_path, "corrupt jpeg")
    out = tmp_path / "out"
    with pytest.raises(TooManyBadSamples, match=r"1 of 3 records are bad, more than max_bad_fraction=0.2 .*c\.jpg"):
        convert_coco(images, annotations, out, name="x", tasks=["detection"], bad_sample_policy="skip",
                     max_bad_fraction=0.2)
    assert not out.exists() or not any(out.iterdir())


def test_skip_in_semantic_and_image_folder_sources(raw, tmp_path):
    split_dir = _copy_tree(raw["shapes_semantic"]["val"], tmp_path / "semantic")
    masks = sorted((split_dir / "masks").iterdir())
    Image.new("L", (64, 128)).save(masks[-1])  # wrong size
    manifest = convert_semantic(split_dir / "images", split_dir / "masks", tmp_path / "sem", name="sem",
                                classes=SEMANTIC_CLASSES, bad_sample_policy="skip", max_bad_fraction=0.5)
    assert manifest.num_samples == len(masks) - 1
    listed = json.loads((tmp_path / "sem" / SKIPPED_NAME).read_text())["skipped"]
    assert [r["record"] for r in listed] == [str(masks[-1])] and "64x128" in listed[0]["problems"][0]

    root = _copy_tree(raw["shapes_classes"]["val"], tmp_path / "folder")
    files = sorted(root.rglob("*.jpg"))
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])  # truncated
    manifest = convert_image_folder(root, tmp_path / "cls", name="cls", bad_sample_policy="skip",
                                    max_bad_fraction=0.5)
    assert manifest.num_samples == len(files) - 1
    listed = json.loads((tmp_path / "cls" / SKIPPED_NAME).read_text())["skipped"]
    assert [r["record"] for r in listed] == [str(files[0])]
    # Image ids stay 0..n-1 over the kept images.
    ids = sorted(json.loads(s["json"])["image"]["id"] for s in _read_webdataset(manifest.shard_urls()).values())
    assert ids == list(range(len(files) - 1))


def test_failure_while_writing_leaves_no_shard_behind(tiny_coco, tmp_path):
    (tmp_path / "x-000001.tar").mkdir()  # the second shard cannot be renamed into place
    with pytest.raises(IsADirectoryError):
        convert_coco(*tiny_coco, tmp_path, name="x", tasks=["detection"], shard_max_samples=1, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["x-000001.tar"]
    assert not any(tmp_path.glob("*/*"))


# --- command line -------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="polytask data")
    add_data_subcommands(parser.add_subparsers(dest="data_command", required=True))
    return run_data_command(parser.parse_args(argv))


def test_cli_demo_and_convert(tmp_path, capsys):
    assert _cli(["demo", "--out", str(tmp_path / "demo"), "--train-images", "3", "--val-images", "1"]) == 0
    printed = capsys.readouterr().out
    for split in ("train", "val"):
        for source in DEMO_TASKS:
            assert str(tmp_path / "demo" / split / source / MANIFEST_NAME) in printed
            assert load_manifest(tmp_path / "demo" / split / source).num_samples == (3 if split == "train" else 1)

    root = tmp_path / "demo" / "raw" / "shapes_classes" / "train"
    assert _cli(["convert", "imagefolder", "--root", str(root), "--out", str(tmp_path / "cls"), "--name", "cls"]) == 0
    assert load_manifest(tmp_path / "cls").classes == sorted(SHAPES)

    missing = tmp_path / "nowhere"
    assert _cli(["convert", "imagefolder", "--root", str(missing), "--out", str(tmp_path / "x"), "--name", "x"]) == 1
    assert str(missing) in capsys.readouterr().err

    broken = sorted(root.rglob("*.jpg"))[0]
    broken.write_bytes(b"not an image")
    args = ["convert", "imagefolder", "--root", str(root), "--out", str(tmp_path / "skip"), "--name", "cls"]
    assert _cli(args) == 1 and str(broken) in capsys.readouterr().err  # raise is the default
    assert _cli([*args, "--bad-sample-policy", "skip", "--max-bad-fraction", "0.5"]) == 0
    assert f"1 bad record(s) skipped, listed with their problems in {tmp_path / 'skip' / SKIPPED_NAME}" in (
        capsys.readouterr().out
    )
    assert _cli([*args, "--bad-sample-policy", "skip", "--max-bad-fraction", "0.1"]) == 1
    assert "records are bad, more than max_bad_fraction=0.1" in capsys.readouterr().err
