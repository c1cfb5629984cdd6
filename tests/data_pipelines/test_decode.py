import io
import json
import re

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import tv_tensors

from data_pipelines.streaming.decode import decode_sample
from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import Manifest, ShardInfo
from data_pipelines.schema import IGNORE_INDEX, TASK_TYPES, task_mask_for
from tests.data_pipelines.shard_fixtures import KEYPOINT_SCHEMA, jpeg_bytes, png_bytes, sample_member, write_source

H, W = 20, 24
ALL_TASKS = list(TASK_TYPES)
# Listed first, so the label space's indices differ from the raw ids of the source under test.
EARLIER = Manifest(
    name="earlier",
    tasks=["detection", "semantic", "classification"],
    shards=[ShardInfo(path="unused.tar", num_samples=1)],
    categories=[{"id": 2, "name": "dog"}],
    semantic_classes=["sky"],
    classes=["outdoor"],
)
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]
EXPECTED_INDEX = {1: 1, 3: 2, 7: 0}  # thing_classes == ["dog", "person", "car"]


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def _annotations() -> tuple[list[dict], np.ndarray, np.ndarray]:
    rle_mask = np.zeros((H, W), dtype=np.uint8)
    rle_mask[10:15, 12:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode()  # as stored in COCO json
    crowd_mask = np.zeros((H, W), dtype=np.uint8)
    crowd_mask[0:4, 0:6] = 1
    crowd_mask[2:6, 18:24] = 1
    anns = [
        {
            "id": 1, "category_id": 3, "bbox": [2, 3, 8, 6], "area": 48, "iscrowd": 0,
            "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]],
            "keypoints": [3, 4, 2, 5, 6, 1, 0, 0, 0], "num_keypoints": 2,
        },
        {
            "id": 2, "category_id": 7, "bbox": [12, 10, 8, 5], "area": 40, "iscrowd": 0,
            "segmentation": compressed,
            "keypoints": [13, 11, 1, 0, 0, 0, 19, 14, 2], "num_keypoints": 2,
        },
        {
            "id": 3, "category_id": 1, "bbox": [0, 0, 24, 6], "area": 48, "iscrowd": 1,
            "segmentation": {"size": [H, W], "counts": _uncompressed_counts(crowd_mask)},
            "keypoints": [0] * 9, "num_keypoints": 0,
        },
    ]
    return anns, rle_mask, crowd_mask


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    anns, rle_mask, crowd_mask = _annotations()
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    seg = np.zeros((H, W), dtype=np.uint8)
    seg[:, 12:] = 1
    seg[0, :] = IGNORE_INDEX
    meta = {"image": {"id": 1, "file_name": "a.png", "width": W, "height": H}, "annotations": anns, "class_id": 0}
    raw = sample_member("img-001", image=b"", meta=meta, seg=png_bytes(seg))
    del raw["jpg"]
    raw["png"] = png_bytes(rgb)  # lossless, so the decoded pixels can be compared exactly
    manifest = write_source(
        tmp_path_factory.mktemp("main"), [raw], name="main", tasks=ALL_TASKS, categories=CATEGORIES,
        keypoints=KEYPOINT_SCHEMA, semantic_classes=["road", "sky"], classes=["indoor", "outdoor"],
    )
    expected = dict(rgb=rgb, seg=seg, anns=anns, rle=rle_mask, crowd=crowd_mask)
    return manifest, build_label_space([EARLIER, manifest]), expected


def _read_first(manifest: Manifest) -> dict:
    return next(iter(wds.WebDataset(manifest.shard_urls(), shardshuffle=False)))


def test_decoded_sample_matches_annotations(source):
    manifest, space, exp = source
    out = decode_sample(_read_first(manifest), manifest=manifest, label_space=space)

    assert out["key"] == "main/img-001" and out["source"] == "main"
    assert torch.equal(out["task_mask"], task_mask_for(ALL_TASKS, TASK_TYPES))
    assert isinstance(out["image"], tv_tensors.Image) and out["image"].dtype == torch.uint8
    assert torch.equal(out["image"], torch.from_numpy(exp["rgb"]).permute(2, 0, 1))

    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)
    assert out["boxes"].canvas_size == (H, W) and out["boxes"].format.name == "XYXY"
    xyxy = torch.tensor([[2, 3, 10, 9], [12, 10, 20, 15], [0, 0, 24, 6]], dtype=torch.float32)
    assert torch.equal(out["boxes"], xyxy)
    assert out["labels"].tolist() == [EXPECTED_INDEX[a["category_id"]] for a in exp["anns"]] == [2, 0, 1]
    assert out["iscrowd"].tolist() == [False, False, True]

    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(exp["anns"][0]["segmentation"], H, W)))
    assert isinstance(out["masks"], tv_tensors.Mask) and out["masks"].dtype == torch.uint8
    assert out["masks"].shape == (3, H, W)
    assert torch.equal(out["masks"][0], torch.from_numpy(polygon))
    assert torch.equal(out["masks"][1], torch.from_numpy(exp["rle"]))
    assert torch.equal(out["masks"][2], torch.from_numpy(exp["crowd"]))

    assert isinstance(out["keypoints"], tv_tensors.KeyPoints) and out["keypoints"].shape == (3, 3, 2)
    assert out["keypoints"][0].tolist() == [[3, 4], [5, 6], [0, 0]]
    assert out["keypoints"][1].tolist() == [[13, 11], [0, 0], [19, 14]]
    assert out["keypoint_visibility"].tolist() == [[2, 1, 0], [1, 0, 2], [0, 0, 0]]

    # main's "road"(0) -> 1, "sky"(1) -> 0 in the merged space; 255 stays unlabelled.
    seg = torch.from_numpy(exp["seg"]).long()
    expected_sem = torch.where(seg == IGNORE_INDEX, IGNORE_INDEX, 1 - seg)
    assert isinstance(out["semantic"], tv_tensors.Mask) and out["semantic"].dtype == torch.int64
    assert torch.equal(out["semantic"], expected_sem)
    assert out["class_label/classification"].item() == 1  # "indoor" comes after "outdoor" from the earlier source


def test_grayscale_jpeg_decodes_to_rgb():
    manifest = Manifest(name="cls", tasks=["classification"], shards=[], classes=["a"])
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5), 128, dtype=np.uint8)).save(buf, "JPEG")
    meta = {"image": {"width": 5, "height": 6}, "annotations": [], "class_id": 0}
    raw = sample_member("g", image=buf.getvalue(), meta=meta) | {"__url__": "x.tar"}
    out = decode_sample(raw, manifest=manifest, label_space=build_label_space([manifest]))
    assert out["image"].shape == (3, 6, 5) and out["image"].dtype == torch.uint8
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert "masks" not in out and "semantic" not in out


def _detection_raw(**overrides) -> dict:
    meta = {
        "image": {"width": 16, "height": 12},
        "annotations": [
            {"id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]}
        ],
    }
    raw = sample_member("bad-key-7", image=jpeg_bytes(12, 16), meta=meta) | {"__url__": "/data/det/det-000003.tar"}
    return raw | overrides


def _meta(**changes) -> bytes:
    meta = json.loads(_detection_raw()["json"])
    meta.update(changes)
    return json.dumps(meta).encode()


def _ann(*, drop: str | None = None, **changes) -> bytes:
    meta = json.loads(_detection_raw()["json"])
    meta["annotations"][0].update(changes)
    meta["annotations"][0].pop(drop, None)
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    "overrides, what",
    [
        ({"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg"}, "cannot decode 'jpg'"),
        ({"jpg": jpeg_bytes(12, 16)[:200]}, "cannot decode 'jpg'"),
        ({"json": b'{"image": {"width": 16, "height": 12}}'}, r"missing key\(s\) \['annotations'\]"),
        ({"json": b"{not json"}, "not valid JSON"),
        ({"json": _ann(drop="bbox")}, r"annotation 0 is missing key\(s\) \['bbox'\]"),
        ({"json": _ann(drop="segmentation")}, r"annotation 0 is missing key\(s\) \['segmentation'\]"),
        ({"json": _ann(category_id=5)}, r"unknown category id\(s\) \[5\]"),
        ({"json": _meta(image={"width": 10, "height": 12})}, "json says 12x10"),
        # Mistyped fields (annotation_check, shared with the converters).
        ({"json": _meta(image={"width": "16", "height": 12})}, r"'json' image: width '16' is not a positive integer"),
        ({"json": _meta(annotations=[None])}, "annotation 0 is null, expected an object"),
        ({"json": _ann(iscrowd=2)}, "annotation 0: iscrowd 2 is not 0 or 1"),
        ({"json": _ann(segmentation={"size": [12, 16], "counts": [5, 3]})},
         "annotation 0: RLE counts cover 8 pixels, the image has 192"),
        ({"json": _ann(segmentation=[[1, 1, 5, 1, 5]])}, "annotation 0: segmentation polygon 0 has 5 values"),
    ],
)
def test_bad_sample_raises_naming_shard_and_key(overrides, what):
    manifest = Manifest(name="det", tasks=["detection", "instance_mask"], shards=[], categories=CATEGORIES)
    with pytest.raises(ValueError, match=re.escape("/data/det/det-000003.tar") + ".*'bad-key-7'.*" + what):
        decode_sample(_detection_raw(**overrides), manifest=manifest, label_space=build_label_space([manifest]))


def test_unknown_semantic_id_raises():
    manifest = Manifest(name="sem", tasks=["semantic"], shards=[], semantic_classes=["a", "b"])
    meta = {"image": {"width": 4, "height": 3}, "annotations": []}
    raw = sample_member("s", image=jpeg_bytes(3, 4), meta=meta, seg=png_bytes(np.full((3, 4), 9, np.uint8)))
    with pytest.raises(ValueError, match=r"s\.tar.*unknown semantic id\(s\) \[9\]"):
        decode_sample(raw | {"__url__": "s.tar"}, manifest=manifest, label_space=build_label_space([manifest]))


def test_keypoint_only_source_without_keypoints_on_an_annotation():
    manifest = Manifest(name="kp", tasks=["keypoints"], shards=[], categories=CATEGORIES, keypoints=KEYPOINT_SCHEMA)
    anns = [
        {"id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "keypoints": [1, 1, 2, 2, 2, 2, 3, 3, 1]},
        {"id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},  # a category without keypoints
    ]
    raw = sample_member("k", image=jpeg_bytes(6, 8), meta={"image": {"width": 8, "height": 6}, "annotations": anns})
    out = decode_sample(raw | {"__url__": "kp.tar"}, manifest=manifest, label_space=build_label_space([manifest]))
    assert out["keypoint_visibility"].tolist() == [[2, 2, 1], [0, 0, 0]]
    # A keypoints-only source has no detection label space: labels say "no class".
    assert out["labels"].tolist() == [-1, -1]
