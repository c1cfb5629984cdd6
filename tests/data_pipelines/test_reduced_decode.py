"""Reduced-size JPEG decoding (``decode_sample(..., decode_size=)``): the image comes out
at 1/r of its size and every annotation lands on the same pixels as at full size."""
import io
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from data_pipelines.streaming.decode import decode_sample, full_size_semantic
from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import Manifest
from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.streaming.transforms import build_train_transforms
from data_pipelines.streaming.config import TransformConfig
from tests.data_pipelines.shard_fixtures import KEYPOINT_SCHEMA, jpeg_bytes, png_bytes, sample_member

TASKS = ["detection", "instance_mask", "keypoints", "semantic"]
MANIFEST = Manifest(name="big", tasks=TASKS, shards=[], categories=[{"id": 1, "name": "thing"}],
                    keypoints=KEYPOINT_SCHEMA, semantic_classes=["bg", "thing"])
SPACE = build_label_space([MANIFEST])
RECT = (20, 16, 60, 48)  # x, y, w, h of the bright object (polygon instance, semantic class 1)
BLOB = (100, 70, 28, 20)  # x, y, w, h of the RLE instance


def _rect_mask(height: int, width: int, rect: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = rect
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def big_sample(height: int, width: int, image: bytes | None = None) -> dict:
    """A smooth image with a bright object at RECT, annotated as polygon + box + keypoints
    + semantic class, and a second instance as compressed RLE."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 80 // width, yy * 80 // height, np.full_like(xx, 40)], -1).astype(np.uint8)
    pixels[_rect_mask(height, width, RECT) == 1] = 230
    x, y, w, h = RECT
    blob = mask_utils.encode(np.asfortranarray(_rect_mask(height, width, BLOB)))
    blob["counts"] = blob["counts"].decode()
    anns = [
        {"id": 1, "category_id": 1, "bbox": list(RECT), "iscrowd": 0,
         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
         "keypoints": [x + 1, y + 1, 2, x + w - 2, y + h - 2, 1, 0, 0, 0]},
        {"id": 2, "category_id": 1, "bbox": list(BLOB), "iscrowd": 1, "segmentation": blob},
    ]
    seg = _rect_mask(height, width, RECT)
    seg[:, :3] = IGNORE_INDEX
    meta = {"image": {"id": 1, "width": width, "height": height}, "annotations": anns}
    raw = sample_member("big", image=image if image is not None else _jpeg(pixels), meta=meta, seg=png_bytes(seg))
    return raw | {"__url__": "big.tar"}


def decode(raw: dict, decode_size: int | None) -> dict:
    return decode_sample(raw, manifest=MANIFEST, label_space=SPACE, decode_size=decode_size)


@pytest.mark.parametrize(
    "height, width, decode_size, r",
    [(96, 136, 40, 2), (96, 136, 24, 4), (96, 136, 12, 8),
     # The largest r that divides both sides: 134 / 4 would end in a partial pixel.
     (100, 134, 24, 2)],
)
def test_annotations_are_scaled_by_the_decoded_factor(height, width, decode_size, r):
    full, out = decode(big_sample(height, width), None), decode(big_sample(height, width), decode_size)
    size = (height // r, width // r)
    assert out["image"].shape == (3, *size) and out["image"].dtype == torch.uint8
    # libjpeg maps original x to x / r exactly: the decoded frame is the original one / r.
    assert out["boxes"].canvas_size == size and torch.equal(out["boxes"], full["boxes"] / r)
    assert out["keypoints"].canvas_size == size and torch.equal(out["keypoints"], full["keypoints"] / r)
    assert torch.equal(out["keypoint_visibility"], full["keypoint_visibility"])
    assert out["masks"].shape == (2, *size) and out["semantic"].shape == size
    assert torch.equal(out["labels"], full["labels"]) and torch.equal(out["iscrowd"], full["iscrowd"])


@pytest.mark.parametrize("decode_size, r", [(40, 2), (24, 4)])
def test_pixels_masks_and_boxes_stay_aligned(decode_size, r):
    height, width = 96, 136
    out = decode(big_sample(height, width), decode_size)
    x0, y0, x1, y1 = out["boxes"][0].tolist()
    # The polygon's mask, rasterised at the decoded size, fills its box.
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert x0 - 1 <= xs.min() and xs.max() <= x1 and y0 - 1 <= ys.min() and ys.max() <= y1
    assert out["masks"][0].sum() >= 0.8 * (x1 - x0) * (y1 - y0)
    # The RLE is sampled at decoded pixel centres: original pixel r i + r // 2.
    centres = lambda n: np.arange(n // r) * r + r // 2  # noqa: E731
    full_blob = _rect_mask(height, width, BLOB)[centres(height)[:, None], centres(width)]
    assert torch.equal(out["masks"][1], torch.from_numpy(full_blob))
    # Semantic: the same sampling, then the label-space mapping (255 stays unlabelled).
    seg = _rect_mask(height, width, RECT)
    seg[:, :3] = IGNORE_INDEX
    assert torch.equal(out["semantic"], torch.from_numpy(seg[centres(height)[:, None], centres(width)]).long())
    # The bright object is where its box says, in the decoded pixels.
    grey = out["image"].float().mean(0)
    inside = grey[math.ceil(y0) + 1 : math.floor(y1) - 1, math.ceil(x0) + 1 : math.floor(x1) - 1]
    assert inside.min() > 180
    assert grey[: math.floor(y0) - 1].max() < 130 and grey[:, math.ceil(x1) + 1 :].max() < 130
    # And the decoded image is the full one averaged over r x r blocks, up to JPEG rounding.
    full = decode(big_sample(height, width), None)["image"].float()
    pooled = torch.nn.functional.avg_pool2d(full[None], r)[0]
    assert (out["image"].float() - pooled).abs().mean() < 3


def test_training_targets_do_not_depend_on_the_decode_path():
    """Full decode or reduced, the train transforms put every target on the same pixels."""
    cfg = TransformConfig(image_size=24, hflip_prob=0.5)
    transforms = build_train_transforms(cfg, flip_permutation=KEYPOINT_SCHEMA.flip_permutation())
    raw = big_sample(96, 136)
    for seed in range(4):
        outs = []
        for decode_size in (None, cfg.decode_size()):
            torch.manual_seed(seed)
            outs.append(transforms(decode(raw, decode_size)))
        full, reduced = outs
        assert torch.allclose(reduced["boxes"], full["boxes"], atol=1e-4)
        assert torch.allclose(reduced["keypoints"], full["keypoints"], atol=1e-4)
        assert torch.equal(reduced["keypoint_visibility"], full["keypoint_visibility"])
        assert (reduced["masks"] != full["masks"]).float().mean() < 0.03
        assert (reduced["semantic"] != full["semantic"]).float().mean() < 0.03
        assert (reduced["image"].float() - full["image"].float()).abs().mean() < 3


@pytest.mark.parametrize("max_size", [200, 40])  # the shorter side rules; the longer side's cap rules
def test_short_side_never_decodes_below_what_its_resize_needs(max_size):
    # 96x136, shorter side to 24 * s, s up to 1.5: 36 pixels needed, decoded at 1/2 (48x68).
    cfg = TransformConfig(resize="short_side", image_size=24, max_size=max_size, scale_range=(0.75, 1.5))
    assert cfg.decode_size() == 36
    raw = big_sample(96, 136)
    assert decode(raw, cfg.decode_size())["image"].shape == (3, 48, 68)
    transforms = build_train_transforms(cfg, flip_permutation=KEYPOINT_SCHEMA.flip_permutation())
    for seed in range(6):
        outs = []
        for decode_size in (None, cfg.decode_size()):
            torch.manual_seed(seed)
            outs.append(transforms(decode(raw, decode_size)))
        full, reduced = outs
        # The same output size either way, and a reduced decode is never upsampled.
        assert reduced["image"].shape == full["image"].shape
        assert reduced["image"].shape[-2] <= 48 and reduced["image"].shape[-1] <= 68
        assert torch.allclose(reduced["boxes"], full["boxes"], atol=1e-3)
        assert torch.allclose(reduced["keypoints"], full["keypoints"], atol=1e-3)


def test_decode_size_is_what_the_transforms_need():
    assert TransformConfig(image_size=224).decode_size() == 224
    assert TransformConfig(image_size=224, scale_range=(0.5, 1.5)).decode_size() == 336
    assert TransformConfig(image_size=224, reduced_decode=False).decode_size() is None


def test_no_reduction_is_the_full_size_decode():
    # Below twice decode_size on a side; an odd side; a PNG; a CMYK JPEG: decoded exactly
    # as without decode_size.
    small = big_sample(100, 134)
    odd = big_sample(99, 134)
    png = big_sample(100, 134)
    png["png"] = png_bytes(np.asarray(Image.open(io.BytesIO(png.pop("jpg")))))
    cmyk = big_sample(100, 134, image=_jpeg(np.zeros((100, 134, 3), np.uint8)))
    cmyk["jpg"] = _cmyk_jpeg(100, 134)
    for raw, decode_size in ((small, 51), (odd, 24), (png, 24), (cmyk, 24)):
        full, out = decode(raw, None), decode(raw, decode_size)
        assert out.keys() == full.keys()
        for k in full:
            if isinstance(full[k], torch.Tensor):
                assert torch.equal(out[k], full[k]), k


def _cmyk_jpeg(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (width, height), (10, 200, 30, 5)).save(buf, "JPEG")
    return buf.getvalue()


def test_grey_jpeg_decodes_to_rgb_at_reduced_size():
    raw = big_sample(100, 134, image=_jpeg(np.full((100, 134), 90, np.uint8)))
    out = decode(raw, 24)
    assert out["image"].shape == (3, 50, 67) and (out["image"][0] == out["image"][2]).all()


def test_truncated_jpeg_raises_at_reduced_size_too():
    raw = big_sample(100, 134)
    raw["jpg"] = raw["jpg"][: len(raw["jpg"]) // 2]
    with pytest.raises(ValueError, match=r"big\.tar: sample 'big': cannot decode 'jpg' member"):
        decode(raw, 24)


def test_every_semantic_pixel_is_checked_not_only_the_sampled_ones():
    raw = big_sample(100, 134)
    seg = np.zeros((100, 134), np.uint8)
    seg[0, 0] = 7  # not a sampled pixel at r = 2 (those are rows and columns 1, 3, ...)
    raw["seg.png"] = png_bytes(seg)
    with pytest.raises(ValueError, match=r"unknown semantic id\(s\) \[7\]"):
        decode(raw, 24)


def test_a_noise_jpeg_as_in_the_fixtures_reduces_too():
    out = decode(big_sample(64, 64, image=jpeg_bytes(64, 64)), 16)
    assert out["image"].shape == (3, 16, 16)


def test_evaluation_gets_the_semantic_mask_at_full_size():
    raw = big_sample(100, 134)
    assert decode(raw, 24)["semantic"].shape == (50, 67)
    full = full_size_semantic(raw, manifest=MANIFEST, label_space=SPACE)
    assert type(full) is torch.Tensor and torch.equal(full, decode(raw, None)["semantic"].as_subclass(torch.Tensor))


@pytest.mark.parametrize("decode_size", [24, None])  # reduced (50 x 67) and full-size decode
def test_eval_records_hold_the_full_size_semantic_mask(decode_size):
    from data_pipelines.streaming.eval_loader import EvalStream

    raw = big_sample(100, 134)
    stream = EvalStream([MANIFEST], label_space=SPACE, transform=lambda s: s, decode_size=decode_size,
                        rank=0, world_size=1, max_images=None)
    _, record = stream._prepare(raw, MANIFEST)
    assert torch.equal(record.semantic, decode(raw, None)["semantic"].as_subclass(torch.Tensor))
