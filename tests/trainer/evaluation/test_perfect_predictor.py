"""Ground truth fed back through the whole prediction path (resized frame -> original ids
and pixels) must score perfectly: any id, coordinate or size mapping bug shows here."""
import json

import pycocotools.mask as mask_utils
import pytest
import torch

from tests.trainer.evaluation.fakes import GroundTruthModel
from data_pipelines.streaming.config import TransformConfig
from data_pipelines.streaming.eval_loader import ImageRecord, build_eval_loader
from tests.trainer.evaluation.tiny_sources import IMAGE_SIZE, NUM_IMAGES, SOURCES
from data_pipelines.streaming.config import SourceConfig
from trainer.evaluation.eval_sources import map_eval_sources
from trainer.evaluation.evaluator import evaluate
from trainer.evaluation.predictions import coco_results
from trainer.evaluation.source_spec import source_spec


# short_side at half of IMAGE_SIZE: 48x64 -> 96x128 and 64x48 -> 128x96 (a whole factor, so
# a perfect prediction survives the round trip), in batches of 2 that mix landscape and
# portrait, padded to 128x128: each image must be mapped back with its own size.
SHORT_SIDE = TransformConfig(resize="short_side", image_size=IMAGE_SIZE // 2)


@pytest.fixture(scope="module", params=["square", "short_side"])
def perfect(request, tiny, tmp_path_factory):
    transforms = tiny.transforms if request.param == "square" else SHORT_SIDE
    out_dir = tmp_path_factory.mktemp("perfect")
    model = GroundTruthModel(tiny.manifests, label_space=tiny.label_space, transforms=transforms)
    metrics = evaluate(
        model, tiny.eval_config(), transforms=transforms, label_space=tiny.label_space,
        rank=0, world_size=1, device=torch.device("cpu"), out_dir=out_dir, step=7,
    )
    return metrics, out_dir


def test_short_side_eval_batches_are_padded_and_keep_the_aspect_ratio(tiny):
    space, manifests = map_eval_sources(tiny.label_space, tiny.manifests, [SourceConfig(path=m.root) for m in tiny.manifests])
    loader = build_eval_loader(
        manifests, label_space=space, transforms=SHORT_SIDE,
        rank=0, world_size=1, batch_size=2, num_workers=0, max_images=None,
    )
    mixed = 0
    for batch, records in loader:
        sizes = batch.image_sizes.tolist()
        assert sizes == [[2 * r.height, 2 * r.width] for r in records]
        assert list(batch.images.shape[-2:]) == [max(h for h, _ in sizes), max(w for _, w in sizes)]
        mixed += len({tuple(size) for size in sizes}) > 1
    assert mixed  # some batch holds a landscape and a portrait image


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


def test_a_padded_image_maps_back_with_its_own_size(tiny):
    # A 48x64 image resized to 96x128 in a batch padded to 128x128: boxes scale by its own
    # factor 2 (not 64/128 and 48/128), masks lose the padding before going back to 48x64.
    manifest = next(m for m in tiny.manifests if m.name == "tiny_instances")
    spec = source_spec(manifest, map_eval_sources(tiny.label_space, [manifest], [SourceConfig(path=manifest.root)])[0])
    record = ImageRecord(source=manifest.name, image_id=1, height=48, width=64)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 20:60, 10:50] = 1.0
    mask[..., 96:, :] = 1.0  # the model's output over the padding: not part of the image
    label = next(i for i, c in spec.index_to_category.items() if c == 2)
    output = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "scores": torch.ones(1),
              "labels": torch.tensor([label]), "masks": mask}
    results = coco_results(output, record, spec, input_size=(96, 128))
    assert results["bbox"][0]["bbox"] == pytest.approx([5.0, 10.0, 20.0, 20.0])
    want = torch.zeros(48, 64, dtype=torch.uint8)
    want[10:30, 5:25] = 1
    assert torch.equal(torch.from_numpy(mask_utils.decode(results["segm"][0]["segmentation"])), want)
