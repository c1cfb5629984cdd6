"""The evaluator's COCO numbers are pycocotools' numbers on the results files it wrote,
scored independently here against the raw annotation files (non-contiguous category and
image ids, crowd regions, a category without keypoints)."""
import json

import pytest
import torch

from tests.trainer.evaluation.fakes import GroundTruthModel
from tests.trainer.evaluation.pycocotools_reference import pycocotools_stats
from tests.trainer.evaluation.tiny_sources import KEYPOINT_SIGMAS
from trainer.evaluation.coco_metrics import STAT_NAMES, CocoEvalParams, coco_stats, load_ground_truth
from trainer.evaluation.evaluator import evaluate


@pytest.fixture(scope="module")
def noisy(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("noisy")
    model = GroundTruthModel(tiny.manifests, label_space=tiny.label_space, transforms=tiny.transforms, noise=0.5)
    metrics = evaluate(
        model, tiny.eval_config(), transforms=tiny.transforms, label_space=tiny.label_space,
        rank=0, world_size=1, device=torch.device("cpu"), out_dir=out_dir,
    )
    return metrics, out_dir


@pytest.mark.parametrize(
    "source, iou_type",
    [
        ("tiny_instances", "bbox"),
        ("tiny_instances", "segm"),
        ("tiny_people", "bbox"),
        ("tiny_people", "keypoints"),
        ("tiny_figures", "keypoints"),
    ],
)
def test_stats_identical_to_pycocotools(noisy, tiny, source, iou_type):
    metrics, out_dir = noisy
    expected = pycocotools_stats(
        tiny.annotation_file(source), out_dir / f"{source}_{iou_type}_results.json", iou_type,
        sigmas=KEYPOINT_SIGMAS if iou_type == "keypoints" else None,
    )
    ours = [metrics[f"val/{source}/{iou_type}/{name}"] for name in STAT_NAMES[iou_type]]
    assert ours == expected
    assert 0.0 < ours[0] < 1.0  # a real mix of hits and misses, not a degenerate case


def test_no_detections_score_zero_without_error(tiny, tmp_path):
    path = tiny.annotation_file("tiny_instances")
    (tmp_path / "empty.json").write_text("[]")
    gt = load_ground_truth(path)
    params = CocoEvalParams(image_ids=gt.getImgIds(), category_ids=gt.getCatIds())
    stats = coco_stats(gt, tmp_path / "empty.json", "bbox", params=params)
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert json.loads((tmp_path / "empty.json").read_text()) == []
