"""One tar sample (members by extension, see ``manifest.py``) -> the per-sample schema dict."""
from __future__ import annotations

import functools
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.schema import IGNORE_INDEX, task_mask_for

IMAGE_EXTENSIONS = ("jpg", "png")


def decode_sample(raw: dict[str, bytes], *, manifest: Manifest, label_space: LabelSpace) -> dict:
    """Decode one webdataset sample; any problem raises ValueError naming shard URL and key."""
    try:
        return _decode(raw, manifest, label_space)
    except ValueError as e:
        raise ValueError(f"{raw.get('__url__', '<unknown shard>')}: sample {raw.get('__key__')!r}: {e}") from e


def _decode(raw: dict[str, bytes], manifest: Manifest, label_space: LabelSpace) -> dict:
    source = manifest.name
    tasks = set(manifest.tasks)
    image = _decode_image(raw)
    height, width = image.shape[-2:]
    meta = _decode_json(raw)
    _check_size(meta["image"], height, width)
    anns = meta["annotations"]
    for i, ann in enumerate(anns):
        _require(ann, ("bbox", "category_id"), f"annotation {i}")
        _check_bbox(ann["bbox"], i)

    sample = {
        "key": f"{source}/{raw['__key__']}",
        "source": source,
        "image": image,
        "task_mask": _task_mask(tuple(manifest.tasks)),
        "boxes": F.convert_bounding_box_format(
            tv_tensors.BoundingBoxes(
                torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                format="XYWH",
                canvas_size=(height, width),
            ),
            new_format="XYXY",
        ),
        "labels": _labels(anns, label_space.category_to_index.get(source)),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
    }
    if "instance_mask" in tasks:
        sample["masks"] = _instance_masks(anns, height, width)
    if "keypoints" in tasks:
        assert manifest.keypoints is not None  # Manifest.validate guarantees it
        sample["keypoints"], sample["keypoint_visibility"] = _keypoints(
            anns, len(manifest.keypoints.names), height, width
        )
    if "semantic" in tasks:
        sample["semantic"] = _semantic(raw, label_space.semantic_remap[source], height, width)
    if "classification" in tasks:
        sample["class_label"] = _class_label(meta, label_space.class_remap[source])
    return sample


@functools.lru_cache(maxsize=None)
def _task_mask(tasks: tuple[str, ...]) -> torch.Tensor:
    # Built once per source, not per sample (it costs as much as a small resize); shared
    # read-only: collate stacks copies.
    return task_mask_for(tasks)


def _require(d: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} is missing key(s) {missing}")


def _check_bbox(bbox: object, i: int) -> None:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"annotation {i}: bbox {bbox} is not [x, y, w, h]")
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"annotation {i}: bbox {bbox} has a non-finite coordinate")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"annotation {i}: bbox {bbox} has a negative size")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _decode_image(raw: dict[str, bytes]) -> tv_tensors.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); members are {members}")
    try:
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        image = decode_image(torch.frombuffer(bytearray(raw[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot decode {ext!r} member: {e}") from e
    # 16-bit PNGs decode to uint16; the schema is uint8.
    return tv_tensors.Image(F.to_dtype(image, torch.uint8, scale=True))


def _decode_json(raw: dict[str, bytes]) -> dict:
    if "json" not in raw:
        raise ValueError("no 'json' member")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'json' member is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"'json' member is a {type(meta).__name__}, expected an object")
    _require(meta, ("image", "annotations"), "'json' member")
    return meta


def _check_size(image_info: dict, height: int, width: int) -> None:
    _require(image_info, ("width", "height"), "'json' image")
    if (image_info["height"], image_info["width"]) != (height, width):
        # Annotations are in the json's pixel frame; a mismatch would misplace every box.
        raise ValueError(
            f"image decodes to {height}x{width} (HxW) but json says {image_info['height']}x{image_info['width']}"
        )


def _labels(anns: list[dict], category_to_index: dict[int, int] | None) -> torch.Tensor:
    # Sources without detection/instance_mask (keypoint-only) have no thing-class space:
    # -1 marks "no class"; their task_mask has detection off, so losses never read it.
    if category_to_index is None:
        return torch.full((len(anns),), -1, dtype=torch.int64)
    unknown = sorted({a["category_id"] for a in anns} - set(category_to_index))
    if unknown:
        raise ValueError(f"unknown category id(s) {unknown}; the manifest lists {sorted(category_to_index)}")
    return torch.tensor([category_to_index[a["category_id"]] for a in anns], dtype=torch.int64)


def _instance_masks(anns: list[dict], height: int, width: int) -> tv_tensors.Mask:
    rles = []
    for i, ann in enumerate(anns):
        _require(ann, ("segmentation",), f"annotation {i}")
        rles.append(_to_rle(ann["segmentation"], height, width, i))
    if not rles:
        return tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.uint8))
    masks = mask_utils.decode(rles)  # [H, W, N], Fortran order
    return tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))))


def _to_rle(segm: list | dict, height: int, width: int, i: int) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segm, list):
        if not segm:
            # An empty polygon list labels no pixels.
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        if not all(isinstance(poly, list) and all(_is_number(v) and math.isfinite(v) for v in poly) for poly in segm):
            raise ValueError(f"annotation {i}: segmentation polygons hold non-numeric or non-finite coordinates")
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"annotation {i}: segmentation is neither polygons nor RLE: {str(segm)[:80]}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"annotation {i}: RLE size {segm['size']} != image size {[height, width]}")
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _keypoints(
    anns: list[dict], num_keypoints: int, height: int, width: int
) -> tuple[tv_tensors.KeyPoints, torch.Tensor]:
    rows = []
    for i, ann in enumerate(anns):
        # Categories without keypoints (a car in a person-keypoints source) carry none:
        # all visibility 0, "not labelled".
        values = ann.get("keypoints", [0] * (3 * num_keypoints))
        if len(values) != 3 * num_keypoints:
            raise ValueError(f"annotation {i}: {len(values)} keypoint values, expected 3 x {num_keypoints} (x, y, v)")
        rows.append(values)
    flat = torch.tensor(rows, dtype=torch.float32).reshape(len(anns), num_keypoints, 3)
    if not torch.isfinite(flat).all():
        bad = sorted({i for i, row in enumerate(rows) if not all(math.isfinite(v) for v in row)})
        raise ValueError(f"annotation(s) {bad}: non-finite keypoint values")
    points = tv_tensors.KeyPoints(flat[..., :2].contiguous(), canvas_size=(height, width))
    return points, flat[..., 2].to(torch.int64)


def _semantic(raw: dict[str, bytes], remap: list[int], height: int, width: int) -> tv_tensors.Mask:
    if "seg.png" not in raw:
        raise ValueError("no 'seg.png' member for a semantic source")
    # PIL, not torchvision: palette PNGs must yield their indices, not RGB colours.
    try:
        values = np.asarray(Image.open(io.BytesIO(raw["seg.png"])))
    except OSError as e:
        raise ValueError(f"cannot decode 'seg.png' member: {e}") from e
    if values.shape != (height, width):
        raise ValueError(f"'seg.png' has shape {values.shape}, expected one channel of {(height, width)}")
    # Lookup table over every possible raw value: known ids -> index, 255 stays, others -1.
    lut = torch.full((max(int(values.max()), IGNORE_INDEX) + 1,), -1, dtype=torch.int64)
    lut[: len(remap)] = torch.tensor(remap, dtype=torch.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    out = lut[torch.from_numpy(values.astype(np.int64))]
    if (out < 0).any():
        unknown = sorted(set(np.unique(values[(out < 0).numpy()]).tolist()))
        raise ValueError(f"'seg.png' has unknown semantic id(s) {unknown}; the manifest lists {len(remap)} classes")
    return tv_tensors.Mask(out)


def _class_label(meta: dict, remap: list[int]) -> torch.Tensor:
    _require(meta, ("class_id",), "'json' member of a classification source")
    class_id = meta["class_id"]
    if not isinstance(class_id, int) or not 0 <= class_id < len(remap):
        raise ValueError(f"class_id {class_id!r} is not in [0, {len(remap)})")
    return torch.tensor(remap[class_id], dtype=torch.int64)
