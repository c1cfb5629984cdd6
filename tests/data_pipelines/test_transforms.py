import pytest
import torch
from torchvision import tv_tensors

from data_pipelines.schema import IGNORE_INDEX, TASK_TYPES, task_mask_for
from data_pipelines.streaming.transforms import (
    INSTANCE_KEYS,
    TrainTransforms,
    TransformConfig,
    build_eval_transforms,
    build_train_transforms,
)
from tests.data_pipelines.shard_fixtures import KEYPOINT_SCHEMA

PERM = KEYPOINT_SCHEMA.flip_permutation()  # names: nose, left_hand, right_hand
NOSE, LEFT, RIGHT = 0, 1, 2
LABEL_OFFSET = 10  # labels[i] - LABEL_OFFSET == the instance's original index


def make_sample(height: int, width: int, boxes: list[list[int]], *, seed: int = 0) -> dict:
    """Instances whose mask fills their box (clipped to the image); keypoints: nose
    unlabelled (visibility 0, at 0,0 as COCO stores it), left hand near the box's top-left
    corner (v=2), right hand near its bottom-right corner (v=1)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
    points = torch.zeros((len(boxes), 3, 2))
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, max(y1, 0) : y2, max(x1, 0) : x2] = 1
        points[i, LEFT] = torch.tensor([max(x1, 0) + 1, max(y1, 0) + 1])
        points[i, RIGHT] = torch.tensor([min(x2, width) - 2, min(y2, height) - 2])
    return {
        "key": f"test/{seed}",
        "source": "test",
        "image": tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)),
        "task_mask": task_mask_for(["detection", "instance_mask", "keypoints", "semantic"], TASK_TYPES),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.arange(len(boxes)) + LABEL_OFFSET,
        "iscrowd": torch.arange(len(boxes)) % 2 == 1,
        "masks": tv_tensors.Mask(masks),
        "keypoints": tv_tensors.KeyPoints(points, canvas_size=(height, width)),
        "keypoint_visibility": torch.tensor([[0, 2, 1]] * len(boxes), dtype=torch.int64),
        "semantic": tv_tensors.Mask(torch.randint(0, 3, (height, width), generator=g).masked_fill(
            torch.rand(height, width, generator=g) < 0.2, IGNORE_INDEX)),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert type(a[k]) is type(b[k]), k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


BOXES = [[2, 3, 12, 15], [14, 1, 30, 9], [5, 18, 20, 31]]


def test_flip_twice_is_identity():
    sample = make_sample(32, 32, BOXES)
    flip = build_train_transforms(TransformConfig(image_size=32, hflip_prob=1.0), flip_permutation=PERM)
    once = flip(sample)
    assert not torch.equal(once["image"], sample["image"])
    assert_same(flip(once), sample)


def test_flip_moves_everything_and_swaps_left_right_keypoints():
    sample = make_sample(32, 32, BOXES)
    out = build_train_transforms(TransformConfig(image_size=32, hflip_prob=1.0), flip_permutation=PERM)(sample)

    assert torch.equal(out["image"], sample["image"].flip(-1))
    assert torch.equal(out["masks"], sample["masks"].flip(-1))
    assert torch.equal(out["semantic"], sample["semantic"].flip(-1))
    x1, y1, x2, y2 = sample["boxes"].unbind(-1)
    assert torch.equal(out["boxes"], torch.stack([32 - x2, y1, 32 - x1, y2], dim=-1))
    old, new = sample["keypoints"], out["keypoints"]
    # The new left hand is the mirrored old right hand (torchvision's keypoint flip: x -> W - 1 - x).
    assert torch.equal(new[:, LEFT, 0], 31 - old[:, RIGHT, 0]) and torch.equal(new[:, LEFT, 1], old[:, RIGHT, 1])
    assert torch.equal(new[:, RIGHT, 0], 31 - old[:, LEFT, 0]) and torch.equal(new[:, RIGHT, 1], old[:, LEFT, 1])
    assert out["keypoint_visibility"].tolist() == [[0, 1, 2]] * 3
    assert isinstance(new, tv_tensors.KeyPoints)


def random_sample(seed: int, g: torch.Generator) -> dict:
    h, w = (int(v) for v in torch.randint(20, 60, (2,), generator=g))
    # Some boxes stick out of the image, as slightly-off source annotations do.
    boxes = []
    for _ in range(int(torch.randint(1, 5, (), generator=g))):
        x1, y1 = int(torch.randint(-3, w - 4, (), generator=g)), int(torch.randint(-3, h - 4, (), generator=g))
        bw, bh = int(torch.randint(3, w // 2, (), generator=g)), int(torch.randint(3, h // 2, (), generator=g))
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return make_sample(h, w, boxes, seed=seed)


def check_consistent(out: dict) -> None:
    """Boxes inside the image, per-instance tensors aligned, each mask and visible
    keypoint inside its own box, semantic values from the source or IGNORE_INDEX."""
    height, width = out["image"].shape[-2:]
    n = len(out["boxes"])
    assert all(len(out[k]) == n for k in INSTANCE_KEYS)
    assert out["masks"].shape[-2:] == (height, width) and out["semantic"].shape == (height, width)
    b = out["boxes"]
    assert ((b[:, 0::2] >= 0) & (b[:, 0::2] <= width) & (b[:, 1::2] >= 0) & (b[:, 1::2] <= height)).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert ((out["iscrowd"]) == ((out["labels"] - LABEL_OFFSET) % 2 == 1)).all()
    assert set(out["semantic"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    vis = out["keypoint_visibility"]
    assert (vis[:, NOSE] == 0).all()
    for i in range(n):
        ys, xs = torch.nonzero(out["masks"][i], as_tuple=True)
        if len(xs):  # resampling may smear a mask by a pixel
            assert xs.min() >= b[i, 0] - 1.5 and xs.max() <= b[i, 2] + 0.5
            assert ys.min() >= b[i, 1] - 1.5 and ys.max() <= b[i, 3] + 0.5
        kp = out["keypoints"][i][vis[i] > 0]
        assert ((kp[:, 0] >= 0) & (kp[:, 0] <= width - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= height - 1)).all()
        assert ((kp[:, 0] >= b[i, 0] - 1.5) & (kp[:, 0] <= b[i, 2] + 1.5)).all()
        assert ((kp[:, 1] >= b[i, 1] - 1.5) & (kp[:, 1] <= b[i, 3] + 1.5)).all()


@pytest.mark.parametrize("scale_range", [(1.0, 1.0), (0.5, 2.0)])
def test_annotations_stay_consistent_after_every_step(scale_range):
    """Property test over random samples: the invariants hold after each step of the
    pipeline (a prefix of the steps with the same seed is the pipeline stopped there)."""
    cfg = TransformConfig(image_size=24, hflip_prob=0.5, scale_range=scale_range, brightness=0.4, contrast=0.4,
                          saturation=0.4, hue=0.1)
    steps = build_train_transforms(cfg, flip_permutation=PERM).steps
    g = torch.Generator().manual_seed(1)
    dropped = hidden = padded = 0
    for seed in range(40):
        sample = random_sample(seed, g)
        for k in range(1, len(steps) + 1):
            torch.manual_seed(seed)
            out = TrainTransforms(steps[:k])(sample)
            check_consistent(out)
        assert out["image"].shape == (3, 24, 24) and isinstance(out["semantic"], tv_tensors.Mask)
        assert type(out["semantic"]) is tv_tensors.Mask and isinstance(out["keypoints"], tv_tensors.KeyPoints)
        dropped += len(sample["boxes"]) - len(out["boxes"])
        hidden += int((out["keypoint_visibility"][:, [LEFT, RIGHT]] == 0).sum())
        unlabelled = out["semantic"] == IGNORE_INDEX
        padded += int(unlabelled.all(dim=0).any() or unlabelled.all(dim=1).any())
    if scale_range != (1.0, 1.0):
        # The crops did remove instances and hide keypoints, and zoom-out padded with
        # "unlabelled": every path was exercised.
        assert dropped > 0 and hidden > 0 and padded > 0


def test_colour_jitter_changes_only_the_image():
    sample = make_sample(32, 32, BOXES)
    cfg = TransformConfig(image_size=32, hflip_prob=0.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)
    torch.manual_seed(0)
    out = build_train_transforms(cfg, flip_permutation=PERM)(sample)
    assert not torch.equal(out["image"], sample["image"])
    for k in ("boxes", "masks", "keypoints", "keypoint_visibility", "semantic", "labels"):
        assert torch.equal(out[k], sample[k]), k


def test_degenerate_box_is_dropped_with_its_label_mask_and_keypoints():
    # 8 instances on an 8x8 image: the instance count equals the semantic mask's height,
    # which must not make the semantic mask look per-instance.
    boxes = [[0, 0, 4, 4], [2, 2, 2, 6]] + [[i % 4, 4, i % 4 + 4, 8] for i in range(6)]
    sample = make_sample(8, 8, boxes)
    out = build_train_transforms(TransformConfig(image_size=8, hflip_prob=0.0), flip_permutation=PERM)(sample)
    keep = [0, 2, 3, 4, 5, 6, 7]
    assert (out["labels"] - LABEL_OFFSET).tolist() == keep
    for k in INSTANCE_KEYS:
        assert torch.equal(out[k], sample[k][keep]), k
    assert isinstance(out["keypoints"], tv_tensors.KeyPoints) and isinstance(out["masks"], tv_tensors.Mask)
    assert torch.equal(out["semantic"], sample["semantic"])


def test_keypoints_without_flip_permutation_raise():
    transform = build_train_transforms(TransformConfig(image_size=32, hflip_prob=1.0), flip_permutation=None)
    with pytest.raises(ValueError, match="no flip_permutation"):
        transform(make_sample(32, 32, BOXES))


def test_eval_transforms_resize_only():
    sample = make_sample(32, 40, BOXES)
    out = build_eval_transforms(TransformConfig(image_size=16))(sample)
    assert out["image"].shape == (3, 16, 16) and out["masks"].shape == (3, 16, 16)
    assert torch.allclose(out["boxes"], sample["boxes"] * torch.tensor([16 / 40, 0.5, 16 / 40, 0.5]))
    assert torch.equal(out["keypoint_visibility"], sample["keypoint_visibility"])


def _short_side_checks(sample: dict, out: dict, *, size: float, max_size: float) -> float:
    """The factor ``out`` was resized by, after checking that it is one factor for both
    axes (aspect kept), what ResizeShortestEdge gives, and that every annotation followed."""
    (h, w), (oh, ow) = sample["image"].shape[-2:], out["image"].shape[-2:]
    factor = min(size / min(h, w), max_size / max(h, w))
    assert (oh, ow) == (round(h * factor), round(w * factor))
    assert max(oh, ow) <= round(max_size) and min(oh, ow) <= round(size)
    assert out["masks"].shape[-2:] == (oh, ow) and out["semantic"].shape == (oh, ow)
    scale = torch.tensor([ow / w, oh / h])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), sample["boxes"] * scale.repeat(2))
    torch.testing.assert_close(out["keypoints"].as_subclass(torch.Tensor), sample["keypoints"] * scale)
    assert torch.equal(out["labels"], sample["labels"])
    assert torch.equal(out["keypoint_visibility"], sample["keypoint_visibility"])
    return factor


@pytest.mark.parametrize("height, width, capped", [(60, 100, False), (20, 100, True), (100, 60, False)])
def test_short_side_resize_keeps_the_aspect_ratio_and_moves_every_annotation(height, width, capped):
    # image_size 30, max_size 80: 60x100 -> 30x50 (shorter side rules); 20x100 -> 16x80 (the cap rules).
    sample = make_sample(height, width, [[4, 6, 40, 18], [42, 2, 56, 16]])
    cfg = TransformConfig(resize="short_side", image_size=30, max_size=80, hflip_prob=0.0)
    for out in (build_train_transforms(cfg, flip_permutation=PERM)(sample), build_eval_transforms(cfg)(sample)):
        factor = _short_side_checks(sample, out, size=30, max_size=80)
        assert (factor < 30 / min(height, width)) == capped
        check_consistent(out)


@pytest.mark.parametrize("max_size, side", [(1000, 0), (40, 1)])
def test_short_side_scale_range_scales_both_sides_and_its_cap(max_size, side):
    # 60x100 at image_size 30, s in [0.5, 1.5]: the shorter side is 30 * s (15..45) with a
    # far cap; with max_size 40 the cap rules and the longer side is 40 * s (20..60).
    sample = make_sample(60, 100, BOXES)
    cfg = TransformConfig(resize="short_side", image_size=30, max_size=max_size, scale_range=(0.5, 1.5),
                          hflip_prob=0.0)
    transform = build_train_transforms(cfg, flip_permutation=PERM)
    low, high = (15, 45) if side == 0 else (20, 60)
    sides = []
    for seed in range(30):
        torch.manual_seed(seed)
        out = transform(sample)
        oh, ow = out["image"].shape[-2:]
        assert abs(oh * 100 / 60 - ow) <= 1  # one factor for both sides (up to rounding)
        sides.append(out["image"].shape[-2 + side])
        assert low <= sides[-1] <= high
        scale = torch.tensor([ow / 100, oh / 60])
        torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), sample["boxes"] * scale.repeat(2))
        torch.testing.assert_close(out["keypoints"].as_subclass(torch.Tensor), sample["keypoints"] * scale)
        check_consistent(out)
    assert min(sides) < low + (high - low) / 4 and max(sides) > high - (high - low) / 4  # s spans its range


def test_eval_short_side_is_deterministic_at_scale_one():
    cfg = TransformConfig(resize="short_side", image_size=30, scale_range=(0.5, 1.5))
    sample = make_sample(60, 100, BOXES)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = build_eval_transforms(cfg)(sample)
    assert out["image"].shape == (3, 30, 50)  # max_size defaults to round(30 * 1333 / 800) = 50
    assert torch.equal(torch.get_rng_state(), state)


def test_max_size_with_square_resize_is_an_error():
    with pytest.raises(ValueError, match="TransformConfig.max_size.*short_side"):
        TransformConfig(max_size=1333)


@pytest.mark.parametrize(
    "field, value",
    [("image_size", 0), ("hflip_prob", 1.5), ("scale_range", (0.0, 1.0)), ("scale_range", (2.0, 1.0)),
     ("brightness", -0.1), ("hue", 0.6), ("resize", "longest_side")],
)
def test_transform_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"TransformConfig.{field}"):
        TransformConfig(**{field: value})
