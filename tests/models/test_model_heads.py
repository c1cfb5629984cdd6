"""Every registered head, on random FPN features: losses, masking, DDP graph invariant, predict."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from data_pipelines.schema import IGNORE_INDEX
from models.backbone import FPN_STRIDES
from models.config import ModelConfig
from models.heads import TaskHead, build_head, head_names, register_head
from tests.models.synthetic import NUM_CLASSES, SIZE, make_target

CHANNELS = 64
CFG = ModelConfig(
    fpn_channels=CHANNELS, semantic_channels=64, fcos_num_convs=1, mask_head_convs=1, keypoint_head_convs=1,
    max_rois_per_image=4, detection_score_thresh=0.0,
)
INSTANCE_TASKS = ["detection", "instance_mask", "keypoints"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def build(task: str) -> TaskHead:
    torch.manual_seed(0)
    return build_head(task, cfg=CFG, in_channels=CHANNELS, num_classes=NUM_CLASSES[task])


def features(batch: int, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(batch, CHANNELS, SIZE // s, SIZE // s, generator=g)) for name, s in FPN_STRIDES.items()
    )


def head_loss(head: TaskHead, feats, targets, labelled: list[bool]) -> tuple[torch.Tensor, int]:
    return head.loss(feats, (SIZE, SIZE), targets, torch.tensor(labelled))


def grads(head: TaskHead) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in head.named_parameters()}


@pytest.mark.parametrize("task", head_names())
def test_loss_is_finite_and_reaches_every_parameter(task: str) -> None:
    head = build(task)
    loss, n = head_loss(head, features(2), [make_target(0), make_target(1)], [True, True])
    loss.backward()
    assert n == 2 and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert all(g is not None for g in grads(head).values())
    assert any(g.abs().sum() > 0 for g in grads(head).values())


@pytest.mark.parametrize("task", head_names())
def test_nothing_labelled_gives_exact_zero_and_zero_gradients(task: str) -> None:
    head = build(task)
    loss, n = head_loss(head, features(2), [make_target(0), make_target(1)], [False, False])
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    # Zero, not None: DDP without find_unused_parameters needs every parameter in the graph.
    assert all(g is not None and not g.any() for g in grads(head).values()), grads(head)


@pytest.mark.parametrize("task", head_names())
def test_labelled_sample_without_instances_or_pixels(task: str) -> None:
    empty = make_target(2, num_instances=0)
    empty["semantic"].fill_(IGNORE_INDEX)
    head = build(task)
    loss, n = head_loss(head, features(2), [empty, make_target(1)], [True, False])
    loss.backward()
    assert n == 1 and torch.isfinite(loss)
    assert all(g is not None for g in grads(head).values())
    if task in ("instance_mask", "keypoints", "semantic"):
        assert loss.item() == 0.0  # nothing to supervise (no RoI, every pixel ignored)


@pytest.mark.parametrize("task", head_names())
def test_unlabelled_sample_does_not_change_loss(task: str) -> None:
    # Both sample orders, so neither "first" nor "last" can be special-cased by accident.
    a, b = make_target(0), make_target(1, num_instances=3)
    feats = features(2)
    single = OrderedDict((k, v[:1]) for k, v in feats.items())
    swapped = OrderedDict((k, v.flip(0)) for k, v in feats.items())
    alone, _ = head_loss(build(task), single, [a], [True])
    first, n1 = head_loss(build(task), feats, [a, b], [True, False])
    # An unlabelled sample's targets may lack the task's keys altogether.
    last, n2 = head_loss(build(task), swapped, [{}, a], [False, True])
    both, _ = head_loss(build(task), feats, [a, b], [True, True])
    assert n1 == n2 == 1
    torch.testing.assert_close(first, alone)
    torch.testing.assert_close(last, alone)
    assert not torch.allclose(both, alone)  # b does count once it is labelled


@pytest.mark.parametrize("task", INSTANCE_TASKS)
def test_crowd_instances_do_not_change_loss(task: str) -> None:
    plain = make_target(0)
    donor = make_target(5, num_instances=1)
    stacked = ("boxes", "labels", "masks", "keypoints", "keypoint_visibility")
    crowded = {k: torch.cat([plain[k], donor[k]]) for k in stacked}
    crowded = {**plain, **crowded, "iscrowd": torch.tensor([False, False, True])}
    feats = features(1)
    without, _ = head_loss(build(task), feats, [plain], [True])
    with_crowd, _ = head_loss(build(task), feats, [crowded], [True])
    torch.testing.assert_close(with_crowd, without)
    # ... and the same instance, not marked crowd, is trained on.
    crowded["iscrowd"] = torch.zeros(3, dtype=torch.bool)
    as_instance, _ = head_loss(build(task), feats, [crowded], [True])
    assert not torch.allclose(as_instance, without)


def test_roi_heads_cap_rois_per_image() -> None:
    head = build("instance_mask")
    seen = []
    head.head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    head_loss(head, features(2), [make_target(0, num_instances=7), make_target(1, num_instances=2)], [True, True])
    assert seen == [CFG.max_rois_per_image + 2]


def _check_detection(out: dict, k: int) -> None:
    boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
    assert boxes.shape[1] == 4 and len(boxes) == len(scores) == len(labels) > 0
    assert len(boxes) <= CFG.detections_per_image
    assert (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert ((scores >= 0) & (scores <= 1)).all() and ((labels >= 0) & (labels < k)).all()


def _check_instance_mask(out: dict, k: int) -> None:
    masks = out["masks"]
    assert masks.shape == (2, 1, SIZE, SIZE) and ((masks >= 0) & (masks <= 1)).all()


def _check_keypoints(out: dict, k: int) -> None:
    assert out["keypoints"].shape == (2, k, 3) and out["keypoint_scores"].shape == (2, k)
    assert torch.isfinite(out["keypoints"]).all()


def _check_semantic(out: dict, k: int) -> None:
    assert out["semantic_logits"].shape == (k, SIZE, SIZE) and out["semantic"].shape == (SIZE, SIZE)
    assert ((out["semantic"] >= 0) & (out["semantic"] < k)).all()


def _check_classification(out: dict, k: int) -> None:
    assert out["class_logits"].shape == (k,)
    torch.testing.assert_close(out["class_scores"].sum(), torch.tensor(1.0))


CHECKS = {
    "detection": _check_detection,
    "instance_mask": _check_instance_mask,
    "keypoints": _check_keypoints,
    "semantic": _check_semantic,
    "classification": _check_classification,
}


@pytest.mark.parametrize("task", head_names())
def test_predict_is_well_formed(task: str) -> None:
    assert task in CHECKS, f"add a predict check for the new head {task!r}"
    targets = [make_target(0), make_target(1)]
    detections = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(2)} for t in targets]
    outputs = build(task).predict(features(2), (SIZE, SIZE), detections=detections)
    assert len(outputs) == 2
    for out in outputs:
        CHECKS[task](out, NUM_CLASSES[task])


def test_a_task_takes_one_head() -> None:
    with pytest.raises(ValueError, match="semantic"):
        register_head("semantic")(TaskHead)


@pytest.mark.parametrize("small", [(72, 100), (128, 40)])
def test_classification_pools_an_image_over_its_own_cells_not_the_batch_padding(small: tuple[int, int]) -> None:
    torch.manual_seed(0)
    head = build_head("classification", cfg=ModelConfig(**{**CFG.__dict__, "classification_head_convs": 0}),
                      in_channels=CHANNELS, num_classes=NUM_CLASSES["classification"])
    feats = features(2)
    h, w = small
    crop = OrderedDict()
    for name, s in FPN_STRIDES.items():
        rows, cols = -(-h // s), -(-w // s)
        crop[name] = feats[name][1:, :, :rows, :cols].clone()
        feats[name][1, :, rows:] = 1e3  # the padding: whatever it holds must not count
        feats[name][1, :, :, cols:] = -1e3
    sizes = [(SIZE, SIZE), (h, w)]
    alone = head.predict(crop, (h, w))[0]["class_logits"]
    batched = head.predict(feats, (SIZE, SIZE), image_sizes=sizes)
    assert torch.allclose(batched[1]["class_logits"], alone, atol=1e-5)
    assert torch.allclose(batched[0]["class_logits"], head.predict(OrderedDict((k, v[:1]) for k, v in feats.items()), (SIZE, SIZE))[0]["class_logits"],
                          atol=1e-5)  # a full-size image pools as before
    assert not torch.allclose(head.predict(feats, (SIZE, SIZE))[1]["class_logits"], alone, atol=1e-2)
    target = make_target(0)
    loss_batched, _ = head.loss(feats, (SIZE, SIZE), [target, target], torch.tensor([False, True]), image_sizes=sizes)
    loss_alone, _ = head.loss(crop, (h, w), [target], torch.tensor([True]))
    assert torch.allclose(loss_batched, loss_alone, atol=1e-5)


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_box_regression_gets_a_gradient_after_every_output_went_negative(activation: str) -> None:
    """What happened to a demo run with ReLU: every regression output negative, so every
    box has zero size and no gradient reaches the regression layer again. Softplus keeps
    one (and the same parameter names, so checkpoints keep their keys)."""
    torch.manual_seed(0)
    head = build_head("detection", cfg=ModelConfig(**{**CFG.__dict__, "fcos_box_activation": activation}),
                      in_channels=CHANNELS, num_classes=NUM_CLASSES["detection"])
    regression = head.head.regression_head.bbox_reg
    with torch.no_grad():
        regression.bias.fill_(-5.0)  # a dead unit's state: outputs far below 0 everywhere
    loss, _ = head_loss(head, features(2), [make_target(0), make_target(1)], [True, True])
    loss.backward()
    reached = regression.weight.grad.abs().sum() > 0
    assert bool(reached) == (activation == "softplus")
    assert [n for n, _ in head.named_parameters()] == [n for n, _ in build("detection").named_parameters()]
