"""A real run with aspect-preserving resizes (data.transforms.resize=short_side) on the tiny
non-square sources: padded batches cross from a data-loader worker, train with finite
losses, and the run's own evaluation scores padded batches of landscape and portrait images."""
import json
import math

import pytest

from tests.conftest import run_polytask, sources_list
from tests.trainer.evaluation.tiny_sources import NUM_IMAGES, SOURCES

STEPS = 2
EVALUATED = ("tiny_instances", "tiny_people", "tiny_semantic")


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("short_side_run")
    sources = sources_list(tiny.paths[name] for name in SOURCES)
    evaluated = sources_list(tiny.paths[name] for name in EVALUATED)
    overrides = [
        f"run.dir={run_dir}", f"data.sources={sources}", f"eval.sources={evaluated}", "eval.best_metric=null",
        # Batches of 2: landscape (48x64 -> 36x48) and portrait (64x48 -> 48x36) images share them.
        "eval.batch_size=2", "eval.num_workers=0", "data.num_workers=1", "data.batch_size=4",
        "data.transforms.resize=short_side", "data.transforms.image_size=36", "data.transforms.scale_range=[0.75,1.25]",
        f"trainer.max_steps={STEPS}", "trainer.log_every=1", "wandb.mode=disabled", "checkpoint.resume=never",
        "model.detection_score_thresh=0.0", "model.detections_per_image=5", "model.fpn_channels=64",
    ]
    proc = run_polytask("train", "configs/demo_cpu.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, overrides


def test_short_side_training_steps_have_finite_losses(run):
    run_dir, _ = run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {k: v for line in lines for k, v in line.items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses


def test_short_side_evaluation_scores_every_image(run, tiny):
    run_dir, _ = run
    summary = json.loads((run_dir / "eval" / f"step_{STEPS}" / "summary.json").read_text())
    for name in EVALUATED:
        assert summary["sources"][name]["num_images"] == NUM_IMAGES
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    assert "val/tiny_instances/segm/AP" in summary["metrics"] and "val/tiny_semantic/semantic/mIoU" in summary["metrics"]
    # Boxes come back in each image's own original frame (landscape 64 wide, portrait 48 wide),
    # filling it: the model clips them to the resized image, not to the padded batch.
    sizes = {i["id"]: (i["width"], i["height"]) for i in json.loads(tiny.annotation_file("tiny_instances").read_text())["images"]}
    results = json.loads((run_dir / "eval" / f"step_{STEPS}" / "tiny_instances_bbox_results.json").read_text())
    # A 2-step model's 5 detections of an image may all be of classes this source does not
    # annotate (not scored): most images, not necessarily every one, have boxes here.
    assert {r["image_id"] for r in results} <= set(sizes) and len({r["image_id"] for r in results}) >= 3
    for image_id, (width, height) in sizes.items():
        boxes = [r["bbox"] for r in results if r["image_id"] == image_id]
        assert all(x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3 for x, y, w, h in boxes)


def test_short_side_predict_maps_back_to_each_image(run, tiny):
    run_dir, overrides = run
    images = tiny.paths["tiny_instances"].parent / "raw" / "tiny_instances" / "images"
    out = run_dir / "predict"
    proc = run_polytask("predict", "configs/demo_cpu.yaml", "--checkpoint", str(run_dir / "checkpoints" / "latest"),
                     str(images), "--out", str(out), *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {(line["height"], line["width"]) for line in lines} == {(48, 64), (64, 48)}
    for line in lines:
        detections = line["detection"]["detections"]
        assert len(detections) == 5 == len(line["instance_mask"]["segmentations"])
        for d, rle in zip(detections, line["instance_mask"]["segmentations"]):
            x, y, w, h = d["bbox"]
            assert x >= 0 and y >= 0 and x + w <= line["width"] + 1e-3 and y + h <= line["height"] + 1e-3
            assert rle["size"] == [line["height"], line["width"]]
