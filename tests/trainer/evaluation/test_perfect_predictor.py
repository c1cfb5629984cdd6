"""Ground truth fed back through the whole prediction path (resized frame -> original ids
and pixels) must score perfectly: any id, coordinate or size mapping bug shows here."""
import json

import pytest
import torch

from tests.trainer.evaluation.fakes import GroundTruthModel
from tests.trainer.evaluation.tiny_sources import NUM_IMAGES, SOURCES
from trainer.evaluation.evaluator import evaluate


@pytest.fixture(scope="module")
def perfect(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("perfect")
    model = GroundTruthModel(tiny.manifests, label_space=tiny.label_space, transforms=tiny.transforms)
    metrics = evaluate(
        model, tiny.eval_config(), transforms=tiny.transforms, label_space=tiny.label_space,
        rank=0, world_size=1, device=torch.device("cpu"), out_dir=out_dir, step=7,
    )
    return metrics, out_dir


@pytest.mark.parametrize(
    "key",
    [
        "val/tiny_instances/bbox/AP",
        "val/tiny_instances/segm/AP",
        "val/tiny_people/bbox/AP",
        "val/tiny_people/keypoints/AP",
        "val/tiny_figures/keypoints/AP",  # keypoint-only source: detections carry no class of their own
        "val/tiny_semantic/semantic/mIoU",
        "val/tiny_semantic/semantic/pixel_acc",
        "val/tiny_classes/classification/top1",
    ],
)
def test_perfect_predictor_scores_one(perfect, key):
    metrics, _ = perfect
    assert metrics[key] == pytest.approx(1.0, abs=1e-12)


def test_results_use_original_ids_and_summary_names_ground_truth(perfect, tiny):
    metrics, out_dir = perfect
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["step"] == 7 and summary["metrics"] == metrics
    for name in SOURCES:
        assert summary["sources"][name]["num_images"] == NUM_IMAGES
    people = summary["sources"]["tiny_people"]
    assert set(people["ground_truth"]) == {"bbox", "keypoints"}
    for iou_type, path in people["ground_truth"].items():
        # The source's own copy of its json, not the raw file it was converted from.
        assert path == str(tiny.paths["tiny_people"] / "annotations.json")
        results = json.loads((out_dir / people["results"][iou_type]).read_text())
        # person 4 and ball 9 for boxes; keypoint results only for the keypoint category
        assert {r["category_id"] for r in results} == ({4, 9} if iou_type == "bbox" else {4})
    instances = json.loads((out_dir / "tiny_instances_segm_results.json").read_text())
    assert {r["category_id"] for r in instances} == {2, 5, 11}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in instances)
    assert "semantic" not in summary["sources"]["tiny_semantic"].get("ground_truth", {})
