"""One tar sample (members by extension, see ``manifest.py``) -> the per-sample schema dict.

Reduced-size decoding: given ``decode_size`` (``TransformConfig.decode_size()``, the
largest side the transforms resize to), a JPEG is decoded at 1/r of its size (r = 8, 4
or 2, the largest that fits) with libjpeg's DCT scaling when both sides stay at least
``decode_size`` and r divides both: less to decode and far less to resize, for pixels
the resize would average away anyway. (A side r does not divide would end in a partial
pixel, a frame slightly larger than the image's; such an r is not used, so the decoded
frame is always exactly the original one divided by r.) Every annotation is then put
in the decoded frame: boxes and keypoints divided by r (libjpeg maps original x to
x / r), masks rasterised, and semantic masks sampled, at the decoded size.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from data_pipelines.annotation_check import check_annotation, check_annotation_list, check_image_entry
from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.schema import IGNORE_INDEX, class_label_key

IMAGE_EXTENSIONS = ("jpg", "png")


def decode_sample(
    raw: dict[str, bytes], *, manifest: Manifest, label_space: LabelSpace, decode_size: int | None = None
) -> dict:
    """Decode one webdataset sample; any problem raises ValueError naming shard URL and key.

    ``decode_size``: see the module docstring; None decodes every image at full size.
    """
    try:
        return _decode(raw, manifest, label_space, decode_size)
    except (ValueError, TypeError) as e:
        # TypeError too: the json's fields are checked (annotation_check), but a mistyped
        # field missed there must still name the sample and be a bad sample, not kill the rank.
        raise ValueError(f"{raw.get('__url__', '<unknown shard>')}: sample {raw.get('__key__')!r}: {e}") from e


def full_size_semantic(raw: dict[str, bytes], *, manifest: Manifest, label_space: LabelSpace) -> torch.Tensor:
    """The sample's semantic mask (label-space indices) at the original image size, for
    evaluation, which scores there whatever size the sample was decoded at."""
    try:
        frame = Frame(*check_image_entry(_decode_json(raw)["image"], what="'json' image"))
        return _semantic(raw, label_space.semantic_remap[manifest.name], frame).as_subclass(torch.Tensor)
    except ValueError as e:
        raise ValueError(f"{raw.get('__url__', '<unknown shard>')}: sample {raw.get('__key__')!r}: {e}") from e


@dataclass(frozen=True)
class Frame:
    """Original image size, and the reduction ``r`` of the decoded one (1, 2, 4 or 8,
    dividing both sides): original pixel coordinate x is decoded coordinate x / r."""

    height: int
    width: int
    reduction: int = 1

    @property
    def decoded_size(self) -> tuple[int, int]:
        return self.height // self.reduction, self.width // self.reduction


def _decode(raw: dict[str, bytes], manifest: Manifest, label_space: LabelSpace, decode_size: int | None) -> dict:
    source = manifest.name
    tasks = set(manifest.tasks)
    image, frame = _decode_image(raw, decode_size)
    height, width = image.shape[-2:]
    meta = _decode_json(raw)
    _check_size(meta["image"], frame.height, frame.width)
    anns = check_annotation_list(meta["annotations"], what="'json' annotations")
    num_keypoints = len(manifest.keypoints.names) if "keypoints" in tasks and manifest.keypoints else None
    for i, ann in enumerate(anns):
        check_annotation(ann, what=f"annotation {i}", image_size=(frame.height, frame.width),
                         num_keypoints=num_keypoints, require_segmentation="instance_mask" in tasks)
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    if frame.reduction > 1:
        boxes /= frame.reduction
    # XYWH -> XYXY in place, the arithmetic of F.convert_bounding_box_format (float32
    # x + w) without its per-call dispatch and copy.
    boxes[:, 2:] += boxes[:, :2]

    sample = {
        "key": f"{source}/{raw['__key__']}",
        "source": source,
        "image": image,
        "task_mask": label_space.task_mask(source),
        "boxes": tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)),
        "labels": _labels(anns, label_space.category_to_index.get(source)),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
    }
    if "instance_mask" in tasks:
        sample["masks"] = _instance_masks(anns, frame)
    if "keypoints" in tasks:
        assert manifest.keypoints is not None  # Manifest.validate guarantees it
        points, visibility = _keypoints(anns, len(manifest.keypoints.names), frame)
        sample["keypoints"], sample["keypoint_visibility"] = _to_unified_keypoints(
            points, visibility, label_space.keypoint_remap.get(source),
            len(label_space.keypoint_schemas[label_space.task_of(source, "keypoints")].names),
        )
    if "semantic" in tasks:
        sample["semantic"] = _semantic(raw, label_space.semantic_remap[source], frame)
    for label, task in label_space.label_tasks(source).items():
        value = _class_label(meta, label, label_space.class_remap[source][label], single=bool(manifest.classes))
        if value is None:  # not labelled for this field on this image: no loss for the task
            column = label_space.task_names.index(task)
            if sample["task_mask"][column]:
                sample["task_mask"] = sample["task_mask"].clone()
                sample["task_mask"][column] = False
        else:
            sample[class_label_key(task)] = value
    # Which classes the source annotates, for the tasks it covers in part (shared tensors).
    sample.update(label_space.sample_coverage(source))
    return sample


def _require(d: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} is missing key(s) {missing}")


def _decode_image(raw: dict[str, bytes], decode_size: int | None) -> tuple[tv_tensors.Image, Frame]:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); members are {members}")
    if decode_size is not None and ext == "jpg":
        reduced = _decode_jpeg_reduced(raw[ext], decode_size)
        if reduced is not None:
            return reduced
    try:
        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        image = decode_image(torch.frombuffer(bytearray(raw[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot decode {ext!r} member: {e}") from e
    # 16-bit PNGs decode to uint16; the schema is uint8.
    image = tv_tensors.Image(F.to_dtype(image, torch.uint8, scale=True))
    return image, Frame(*image.shape[-2:])


def _decode_jpeg_reduced(data: bytes, decode_size: int) -> tuple[tv_tensors.Image, Frame] | None:
    """The JPEG decoded at 1/r of its size (PIL's ``draft``: libjpeg DCT scaling), see
    the module docstring; None when no reduction fits or the file is not a plain
    RGB/grey JPEG, for the full-size path to decode (or reject) it exactly as without
    ``decode_size``."""
    try:
        pil = Image.open(io.BytesIO(data), formats=["JPEG"])
        width, height = pil.size
        if pil.mode not in ("RGB", "L"):
            return None  # CMYK and others: torchvision's colour conversion, as at full size
        r = reduction_for(height, width, decode_size)
        # draft picks the largest scale s in (8, 4, 2, 1) with s * requested <= both sides: r.
        if r == 1 or pil.draft("RGB", (width // r, height // r)) is None:
            return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    frame = Frame(height, width, reduction=r)
    try:
        pil.load()  # decodes
        if pil.mode != "RGB":
            pil = pil.convert("RGB")  # grey JPEGs are replicated to RGB as torchvision does
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot decode 'jpg' member: {e}") from e
    if (pil.height, pil.width) != frame.decoded_size:  # PIL and libjpeg must agree on the scale
        raise RuntimeError(f"reduced JPEG decode gave {pil.size}, expected {frame.decoded_size[::-1]}")
    # np.array: a writable copy (torch.from_numpy warns on read-only arrays). The CHW view
    # of the HWC pixels is channels-last, the layout the uint8 resize kernel reads fastest.
    return tv_tensors.Image(torch.from_numpy(np.array(pil)).permute(2, 0, 1)), frame


def reduction_for(height: int, width: int, decode_size: int) -> int:
    """The largest r in (8, 4, 2) that keeps both sides >= ``decode_size`` and divides
    both, else 1: the factor a JPEG of this size is decoded at."""
    return next(
        (r for r in (8, 4, 2) if min(height, width) >= r * decode_size and height % r == 0 and width % r == 0), 1
    )


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


def _check_size(image_info: object, height: int, width: int) -> None:
    size = check_image_entry(image_info, what="'json' image")
    if size != (height, width):
        # Annotations are in the json's pixel frame; a mismatch would misplace every box.
        raise ValueError(f"image decodes to {height}x{width} (HxW) but json says {size[0]}x{size[1]}")


def _labels(anns: list[dict], category_to_index: dict[int, int] | None) -> torch.Tensor:
    # Sources without detection/instance_mask (keypoint-only) have no thing-class space:
    # -1 marks "no class"; their task_mask has detection off, so losses never read it.
    if category_to_index is None:
        return torch.full((len(anns),), -1, dtype=torch.int64)
    unknown = sorted({a["category_id"] for a in anns} - set(category_to_index))
    if unknown:
        raise ValueError(f"unknown category id(s) {unknown}; the manifest lists {sorted(category_to_index)}")
    return torch.tensor([category_to_index[a["category_id"]] for a in anns], dtype=torch.int64)


def _instance_masks(anns: list[dict], frame: Frame) -> tv_tensors.Mask:
    height, width = frame.decoded_size
    rles = [_to_rle(ann["segmentation"], frame) for ann in anns]  # checked by check_annotation
    if not rles:
        return tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.uint8))
    masks = mask_utils.decode(rles)  # [H, W, N], Fortran order
    return tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))))


def _to_rle(segm: list | dict, frame: Frame) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE, in the original
    frame, as ``check_segmentation`` accepts) -> compressed RLE at the decoded size."""
    height, width = frame.decoded_size
    r = frame.reduction
    if isinstance(segm, list):
        if not segm:
            # An empty polygon list labels no pixels.
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        if r > 1:  # rasterised at the decoded size: cheaper than at full size and sampling
            segm = [[v / r for v in poly] for poly in segm]
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        segm = mask_utils.frPyObjects(segm, frame.height, frame.width)
    if r > 1:
        # An RLE is only defined at full size: decode it there, sample it as the image was.
        full = mask_utils.decode(segm)
        return mask_utils.encode(np.asfortranarray(_sample_pixels(full, frame)))
    return segm


def _sample_pixels(array: np.ndarray, frame: Frame) -> np.ndarray:
    """Nearest-neighbour sampling of a full-size label array (first two dims H, W) at the
    decoded size: decoded pixel i covers original pixels [r i, r i + r), whose centre is
    original pixel r i + r // 2."""
    r = frame.reduction
    return array[r // 2 :: r, r // 2 :: r]


def _keypoints(anns: list[dict], num_keypoints: int, frame: Frame) -> tuple[tv_tensors.KeyPoints, torch.Tensor]:
    # Categories without keypoints (a car in a person-keypoints source) carry none: all
    # visibility 0, "not labelled". Present ones are checked by check_annotation.
    rows = [ann.get("keypoints", [0] * (3 * num_keypoints)) for ann in anns]
    flat = torch.tensor(rows, dtype=torch.float32).reshape(len(anns), num_keypoints, 3)
    points = flat[..., :2].contiguous()
    if frame.reduction > 1:
        points /= frame.reduction
    return tv_tensors.KeyPoints(points, canvas_size=frame.decoded_size), flat[..., 2].to(torch.int64)


def _to_unified_keypoints(
    points: tv_tensors.KeyPoints, visibility: torch.Tensor, remap: list[int] | None, num_unified: int
) -> tuple[tv_tensors.KeyPoints, torch.Tensor]:
    """The source's keypoints at their unified indices (``LabelSpace.keypoint_remap``); the
    unified keypoints the source lacks get visibility 0, "not labelled": no loss trains them."""
    if remap is None or remap == list(range(num_unified)):
        return points, visibility
    unified_points = torch.zeros((points.shape[0], num_unified, 2), dtype=points.dtype)
    unified_points[:, remap] = points.as_subclass(torch.Tensor)
    unified_visibility = torch.zeros((visibility.shape[0], num_unified), dtype=visibility.dtype)
    unified_visibility[:, remap] = visibility
    return tv_tensors.wrap(unified_points, like=points), unified_visibility


def _semantic(raw: dict[str, bytes], remap: list[int], frame: Frame) -> tv_tensors.Mask:
    height, width = frame.height, frame.width
    if "seg.png" not in raw:
        raise ValueError("no 'seg.png' member for a semantic source")
    # PIL, not torchvision: palette PNGs must yield their indices, not RGB colours.
    try:
        values = np.asarray(Image.open(io.BytesIO(raw["seg.png"])))
    except OSError as e:
        raise ValueError(f"cannot decode 'seg.png' member: {e}") from e
    if values.dtype == bool:  # mode "1" PNGs; indices below must be integers
        values = values.view(np.uint8)
    if values.shape != (height, width):
        raise ValueError(f"'seg.png' has shape {values.shape}, expected one channel of {(height, width)}")
    # Lookup table over every possible raw value: known ids -> index, 255 stays, others -1.
    lut = torch.full((max(int(values.max()), IGNORE_INDEX) + 1,), -1, dtype=torch.int64)
    lut[: len(remap)] = torch.tensor(remap, dtype=torch.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if frame.reduction > 1:
        # Every pixel is checked, only the sampled ones are mapped.
        present = np.zeros(len(lut), dtype=bool)
        present[values] = True
        unknown = np.flatnonzero(present & (lut < 0).numpy()).tolist()
        if unknown:
            raise ValueError(f"'seg.png' has unknown semantic id(s) {unknown}; the manifest lists {len(remap)} classes")
        return tv_tensors.Mask(lut[torch.from_numpy(_sample_pixels(values, frame).astype(np.int64))])
    out = lut[torch.from_numpy(values.astype(np.int64))]
    if (out < 0).any():
        unknown = sorted(set(np.unique(values[(out < 0).numpy()]).tolist()))
        raise ValueError(f"'seg.png' has unknown semantic id(s) {unknown}; the manifest lists {len(remap)} classes")
    return tv_tensors.Mask(out)


def _class_label(meta: dict, label: str, remap: list[int], *, single: bool) -> torch.Tensor | None:
    """The image's class for image-label field ``label`` (``class_id`` for a source with
    ``classes``, ``image_labels[label]`` else, where null or absent is "not labelled")."""
    if single:
        _require(meta, ("class_id",), "'json' member of a classification source")
        class_id, what = meta["class_id"], "class_id"
    else:
        labels = meta.get("image_labels", {})
        if not isinstance(labels, dict):
            raise ValueError(f"'json' image_labels is a {type(labels).__name__}, expected an object")
        class_id, what = labels.get(label), f"image_labels[{label!r}]"
        if class_id is None:
            return None
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < len(remap):
        raise ValueError(f"{what} {class_id!r} is not in [0, {len(remap)})")
    return torch.tensor(remap[class_id], dtype=torch.int64)
