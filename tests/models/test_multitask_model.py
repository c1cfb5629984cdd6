"""The assembled model: losses per task, the DDP graph invariant, per-sample masking, predict, overfitting."""
from __future__ import annotations

import pytest
import torch

from data_pipelines.schema import TASK_TYPES, Batch
from models import ModelConfig, MultiTaskModel, build_model
from models.heads import head_names
from tests.models.synthetic import NUM_CLASSES, make_batch, make_target

SMALL = dict(fpn_channels=64, semantic_channels=64, fcos_num_convs=2, mask_head_convs=2, keypoint_head_convs=2)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def model(**overrides) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**SMALL, **overrides}), num_classes=NUM_CLASSES)


def test_detached_features_stop_head_gradients_at_z() -> None:
    m = model()
    out = m(make_batch([make_target(0), make_target(1)]), detach_features=True)
    sum(out.losses.values()).backward()
    trunk = [p for p in m.backbone.parameters() if p.requires_grad]
    assert all(p.grad is None for p in trunk)  # the heads' backward stops at the detached z
    assert all(z.grad is not None for z in out.head_features.values())
    assert all(z.requires_grad and z.grad_fn is not None for z in out.features.values())


def backward(m: MultiTaskModel, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    losses, counts, *_ = m(batch)
    sum(losses.values()).backward()
    return losses, counts


def only(task: str, rows: int = 2) -> torch.Tensor:
    mask = torch.zeros(rows, len(TASK_TYPES), dtype=torch.bool)
    mask[:, TASK_TYPES.index(task)] = True
    return mask


def test_default_model_trains_every_task_and_every_parameter() -> None:
    torch.manual_seed(0)
    m = build_model(ModelConfig(), num_classes=NUM_CLASSES)
    losses, counts = backward(m, make_batch([make_target(0), make_target(1)]))
    assert list(losses) == list(TASK_TYPES) and counts == {t: 2 for t in TASK_TYPES}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("task", head_names())
def test_absent_tasks_give_zero_loss_and_zero_gradients(task: str) -> None:
    m = model()
    losses, counts = backward(m, make_batch([make_target(0), make_target(1)], task_mask=only(task)))
    assert counts == {t: 2 if t == task else 0 for t in TASK_TYPES}
    for other in set(TASK_TYPES) - {task}:
        assert losses[other].item() == 0.0
        grads = [p.grad for p in m.heads[other].parameters()]
        assert all(g is not None and not g.any() for g in grads), other
    assert all(p.grad is not None for p in m.parameters())  # backbone and FPN included
    assert any(p.grad.any() for p in m.heads[task].parameters())


@pytest.mark.parametrize(
    "tasks",
    [["detection"], ["detection", "instance_mask"], ["detection", "keypoints"], ["semantic"], ["classification"]],
)
def test_every_parameter_is_in_the_graph_for_any_task_subset(tasks: list[str]) -> None:
    # P6/P7 are FCOS levels; the other heads must use them too, or DDP would find them unused.
    m = model(tasks=tasks)
    losses, _ = backward(m, make_batch([make_target(0), make_target(1)]))
    assert list(losses) == tasks
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


def test_unlabelled_sample_does_not_change_any_task_loss() -> None:
    # Frozen BN keeps samples independent through the backbone, so this holds end to end.
    m = model()
    a, b = make_target(0), make_target(1, num_instances=3)
    pair = make_batch([a, b], seed=3)
    pair.task_mask[1] = False
    alone = Batch(images=pair.images[:1], targets=[a], task_mask=pair.task_mask[:1])
    with torch.no_grad():
        pair_losses, pair_counts, *_ = m(pair)
        alone_losses = m(alone).losses
    assert pair_counts == {t: 1 for t in TASK_TYPES}
    for task in TASK_TYPES:
        torch.testing.assert_close(pair_losses[task], alone_losses[task], rtol=1e-4, atol=1e-5, msg=task)


def test_predict_on_unpadded_size() -> None:
    # 120x100 is padded to 128x128 inside; outputs come back in the 120x100 frame.
    m = model(detection_score_thresh=0.0, detections_per_image=5).eval()
    outputs = m.predict(torch.rand(2, 3, 120, 100))
    assert len(outputs) == 2
    for out in outputs:  # per task name; the cascades per box of detection's
        assert list(out) == list(TASK_TYPES)
        det = out["detection"]
        n = len(det["boxes"])
        assert n == 5 and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert (det["boxes"][:, 0::2] <= 100).all() and (det["boxes"][:, 1::2] <= 120).all()
        assert out["instance_mask"]["masks"].shape == (n, 1, 120, 100)
        assert out["keypoints"]["keypoints"].shape == (n, NUM_CLASSES["keypoints"], 3)
        assert out["semantic"]["semantic"].shape == (120, 100)
        assert out["semantic"]["semantic_logits"].shape == (NUM_CLASSES["semantic"], 120, 100)
        assert out["classification"]["class_scores"].shape == (NUM_CLASSES["classification"],)


def test_predict_crops_each_padded_image_to_its_own_size() -> None:
    # A batch padded to 120x100 around a 120x100 and an 80x60 image (aspect-preserving resizes).
    m = model(detection_score_thresh=0.0, detections_per_image=5).eval()
    outputs = m.predict(torch.rand(2, 3, 120, 100), image_sizes=[(120, 100), (80, 60)])
    for out, (h, w) in zip(outputs, [(120, 100), (80, 60)]):
        boxes, semantic = out["detection"]["boxes"], out["semantic"]
        n = len(boxes)
        assert n == 5 and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert out["instance_mask"]["masks"].shape == (n, 1, h, w)
        assert semantic["semantic"].shape == (h, w) and semantic["semantic_logits"].shape[-2:] == (h, w)


def test_no_detection_comes_from_a_point_in_the_batch_padding() -> None:
    # Nothing filtered (score 0, no suppression, room for every point): an image's detections
    # are exactly its FCOS points x classes, and the points must lie inside it, not in the
    # padding around it.
    import math

    from models.backbone import FPN_STRIDES

    m = model(detection_score_thresh=0.0, detection_nms_thresh=1.0, detections_per_image=10_000).eval()
    sizes = [(120, 100), (80, 60)]
    detections = m.predict(torch.rand(2, 3, 120, 100), tasks=["detection"], image_sizes=sizes)
    for out, (h, w) in zip(detections, sizes):
        assert list(out) == ["detection"]
        out = out["detection"]
        inside = sum(math.ceil(h / s) * math.ceil(w / s) for s in FPN_STRIDES.values())  # points at j * stride
        assert len(out["boxes"]) == inside * NUM_CLASSES["detection"], (h, w, len(out["boxes"]))  # one per class


def test_batch_padding_is_the_mean_colour_whatever_its_pixels() -> None:
    # Padding is zero after normalisation (the mean colour), as the model's own padding to
    # size_divisible: the pixels collate put there do not reach the features.
    m = model().eval()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    other = images.clone()
    other[1, :, 40:] = 0.0  # collate's padding (black) below a 40x56 image ...
    other[1, :, :, 56:] = 0.0
    images[1, :, 40:] = 1.0  # ... or anything else
    images[1, :, :, 56:] = 1.0
    sizes = torch.tensor([[64, 96], [40, 56]])
    a, b = m.forward_features(images, sizes.tolist()), m.forward_features(other, sizes.tolist())
    for level in a:
        assert torch.equal(a[level], b[level]), level
    plain = m.forward_features(images)
    assert not torch.equal(plain["p3"][1], a["p3"][1])  # without sizes the pixels count


def test_missing_class_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="semantic"):
        build_model(ModelConfig(**SMALL, tasks=list(TASK_TYPES)), num_classes={t: 3 for t in TASK_TYPES if t != "semantic"})


def test_overfits_one_batch() -> None:
    # Frozen backbone keeps it fast; the heads and FPN must still fit every task.
    m = model(trainable_backbone_layers=0)
    batch = make_batch([make_target(0), make_target(1)])
    optimizer = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(25):
        losses = m(batch).losses
        first = first or {t: v.item() for t, v in losses.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    last = {t: v.item() for t, v in m(batch).losses.items()}
    assert all(last[t] < 0.6 * first[t] for t in TASK_TYPES), (first, last)


def test_the_classification_tower_is_configurable_and_zero_is_the_pooled_linear_head() -> None:
    # 0 layers: the head of checkpoints written before the tower (classifier.* only), so
    # those still load with model.classification_head_convs=0.
    plain = model(classification_head_convs=0).heads["classification"].state_dict()
    assert sorted(plain) == ["classifier.0.bias", "classifier.0.weight", "classifier.1.bias", "classifier.1.weight"]
    towered = model(classification_head_convs=2).heads["classification"]
    assert [type(m).__name__ for m in towered.tower] == ["Conv2d", "GroupNorm", "ReLU"] * 2
    full = model(classification_head_convs=2)
    full(make_batch([make_target(0), make_target(1)])).losses["classification"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in full.heads["classification"].tower.parameters())
    with pytest.raises(ValueError, match="classification_head_convs"):
        ModelConfig(classification_head_convs=-1)


def test_two_tasks_of_one_type_train_their_own_heads_on_their_own_samples() -> None:
    """Named tasks: two classification heads (weather, daytime: other sources, other label
    spaces) and two detection heads. A task's loss reads only the samples its column of the
    task mask marks, and its gradient reaches its own head only."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, tasks={"coco": "detection", "driving": "detection", "weather": "classification",
                                      "daytime": "classification"})
    m = build_model(cfg, num_classes={"coco": 3, "driving": 2, "weather": 4, "daytime": 2})
    assert list(m.heads) == ["coco", "driving", "weather", "daytime"]
    assert m.heads["weather"].classifier[-1].out_features == 4 and m.heads["daytime"].classifier[-1].out_features == 2
    targets = [make_target(i) for i in range(4)]
    targets[1]["labels"] = targets[1]["labels"].clamp(max=1)  # driving's 2 classes
    for t, (task, label) in zip(targets, [("weather", 3), ("daytime", 0), ("weather", 1), ("daytime", 1)]):
        t[f"class_label/{task}"] = torch.tensor(label)  # in its own task's label space
    # coco+weather, driving+daytime, weather, daytime
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    out = m(make_batch(targets, task_mask=mask))
    assert list(out.losses) == ["coco", "driving", "weather", "daytime"]
    assert out.counts == {"coco": 1, "driving": 1, "weather": 2, "daytime": 2}
    out.losses["weather"].backward()
    grads = {name: sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
             for name, head in m.heads.items()}
    assert grads["weather"] > 0 and grads["daytime"] == grads["coco"] == grads["driving"] == 0
    predicted = m.eval().predict(torch.rand(1, 3, 64, 64), tasks=["daytime", "driving"])[0]
    assert list(predicted) == ["driving", "daytime"] and predicted["daytime"]["class_scores"].shape == (2,)
