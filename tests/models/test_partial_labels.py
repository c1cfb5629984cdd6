"""Invariant 7 per class: on a sample whose source does not annotate class c, no loss
reaches the logit of class c (detection, instance masks, semantic, classification); the
same logit on a sample whose source annotates every class still learns."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from data_pipelines.schema import COVERAGE_KEYS, class_coverage_key
from models.backbone import FPN_STRIDES
from models.config import ModelConfig
from models.heads import TaskHead, build_head
from tests.models.synthetic import NUM_CLASSES, SIZE, make_target

CHANNELS = 64
TASKS = ("detection", "instance_mask", "semantic", "classification")
# The partial source annotates every class but these (label-space indices).
UNCOVERED = {"detection": [2], "instance_mask": [2], "semantic": [3, 4], "classification": [3, 4, 5]}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(unannotated: str) -> ModelConfig:
    return ModelConfig(
        fpn_channels=CHANNELS, semantic_channels=64, fcos_num_convs=1, mask_head_convs=1, keypoint_head_convs=1,
        max_rois_per_image=4, unannotated_classes=unannotated,
    )


def _features(batch: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (name, torch.randn(batch, CHANNELS, SIZE // s, SIZE // s, generator=g)) for name, s in FPN_STRIDES.items()
    )


def _partial_target(seed: int) -> dict[str, torch.Tensor]:
    """A sample of a source that annotates thing classes 0-1, semantic 0-2, image classes 0-2:
    its labels lie in them and it carries the coverage vectors decode gives such a source."""
    target = make_target(seed)
    target["labels"] = target["labels"] % 2
    semantic = target["semantic"]
    target["semantic"] = torch.where((semantic > 2) & (semantic != 255), 0, semantic)
    target["class_label/classification"] = torch.tensor(1)
    for task in TASKS:
        covered = torch.ones(NUM_CLASSES[task], dtype=torch.bool)
        covered[UNCOVERED[task]] = False
        target[COVERAGE_KEYS.get(task, class_coverage_key(task))] = covered  # classification: per task
    return target


def _logits_layer(head: TaskHead, task: str) -> nn.Module:
    """The layer whose output holds the class logits (channel / column = class)."""
    return {
        "detection": lambda: head.head.classification_head.cls_logits,  # one anchor per point
        "instance_mask": lambda: head.predictor.mask_fcn_logits,
        "semantic": lambda: head.classifier,
        "classification": lambda: head.classifier[1],
    }[task]()


def _logit_grads(task: str, unannotated: str) -> list[torch.Tensor]:
    """Gradients of the loss w.r.t. every output of the logits layer (per FPN level for
    detection), for a batch of [partial-source sample, full-coverage sample]."""
    torch.manual_seed(0)
    head = build_head(task, cfg=_cfg(unannotated), in_channels=CHANNELS, num_classes=NUM_CLASSES[task])
    grads: list[torch.Tensor] = []

    def keep_grad(_module, _inputs, output):
        output.register_hook(grads.append)

    _logits_layer(head, task).register_forward_hook(keep_grad)
    targets = [_partial_target(0), make_target(1)]
    loss, count = head.loss(_features(2), (SIZE, SIZE), targets, torch.tensor([True, True]))
    assert count == 2 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert grads
    return grads


def _class_grad(grad: torch.Tensor, classes: list[int], *, sample: int, task: str) -> torch.Tensor:
    if task == "instance_mask":  # rows are RoIs: the first image's come first, 2 per image here
        return grad[2 * sample : 2 * sample + 2, classes]
    return grad[sample, classes]


@pytest.mark.parametrize("task", TASKS)
def test_uncovered_class_logit_gets_exactly_zero_gradient(task: str) -> None:
    grads = _logit_grads(task, "ignore")
    for grad in grads:
        uncovered = _class_grad(grad, UNCOVERED[task], sample=0, task=task)
        assert torch.count_nonzero(uncovered) == 0, f"{task}: {uncovered.abs().max()}"
    # What the partial source annotates still learns on its sample.
    covered = [c for c in range(NUM_CLASSES[task]) if c not in UNCOVERED[task]]
    assert any(_class_grad(g, covered, sample=0, task=task).abs().sum() > 0 for g in grads)
    if task != "instance_mask":  # a mask RoI only ever trains its own class's logits
        # The same class on the full-coverage sample is a negative there: it still learns.
        assert any(_class_grad(g, UNCOVERED[task], sample=1, task=task).abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("task", ["detection", "semantic", "classification"])
def test_all_negative_mode_trains_uncovered_classes_as_negatives(task: str) -> None:
    # The naive merge (unannotated_classes: negative), which bench/partial_classes.py compares
    # against: the same logits do get a gradient, so the test above can fail.
    grads = _logit_grads(task, "negative")
    assert any(_class_grad(g, UNCOVERED[task], sample=0, task=task).abs().sum() > 0 for g in grads)


def test_loss_without_coverage_keys_is_unchanged() -> None:
    # Sources that annotate every class carry no coverage vector: nothing is masked, the loss
    # is what it was.
    for task in TASKS:
        torch.manual_seed(0)
        head = build_head(task, cfg=_cfg("ignore"), in_channels=CHANNELS, num_classes=NUM_CLASSES[task])
        targets = [make_target(0), make_target(1)]
        full = [{**t, COVERAGE_KEYS.get(task, class_coverage_key(task)): torch.ones(NUM_CLASSES[task], dtype=torch.bool)}
                for t in targets]
        torch.manual_seed(1)
        plain, _ = head.loss(_features(2), (SIZE, SIZE), targets, torch.tensor([True, True]))
        torch.manual_seed(1)
        masked, _ = head.loss(_features(2), (SIZE, SIZE), full, torch.tensor([True, True]))
        assert torch.equal(plain, masked), task
