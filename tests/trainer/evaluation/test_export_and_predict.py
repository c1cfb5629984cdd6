"""`polytask export` and `polytask predict` on a real 2-step training of the tiny sources.

Export: rebuilt with `build_model` from model.json + model.safetensors in this plain process
(no process group), the model predicts exactly what the checkpoint's model predicts.
Predict: one PNG per image, and predictions.jsonl holds the very numbers that the run's own
evaluation scored (boxes, scores, mask RLEs, class probabilities) for the same images.
"""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models import ModelConfig, build_model
from tests.conftest import run_polytask, sources_list
from tests.trainer.evaluation.tiny_sources import INSTANCE_CATEGORIES, NUM_IMAGES, SOURCES
from trainer.config import load_config
from trainer.export import checkpoint_model
from trainer.weights_digest import weights_digest

STEPS = 2
EVALUATED = ("tiny_instances", "tiny_classes")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """(run dir, overrides, config): a 2-step run that evaluated itself at its end, one image a batch."""
    run_dir = tmp_path_factory.mktemp("run")
    sources = sources_list(tiny.paths[name] for name in SOURCES)
    evaluated = sources_list(tiny.paths[name] for name in EVALUATED)
    overrides = [
        f"run.dir={run_dir}", f"data.sources={sources}", f"eval.sources={evaluated}", "eval.best_metric=null",
        "eval.batch_size=1", "eval.num_workers=0", "data.num_workers=0", "data.transforms.image_size=64",
        f"trainer.max_steps={STEPS}", "wandb.mode=disabled", "checkpoint.resume=never",
        # Not the defaults: the rebuilt model must take them from model.json. A threshold of 0
        # keeps every candidate, so a 2-step model predicts boxes, masks and keypoints.
        "model.detection_score_thresh=0.0", "model.detections_per_image=7", "model.fpn_channels=64",
    ]
    proc = run_polytask("train", "configs/demo_cpu.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, overrides, load_config("configs/demo_cpu.yaml", overrides)


@pytest.fixture(scope="module")
def exported(trained):
    run_dir, overrides, _ = trained
    out = run_dir / "export"
    proc = run_polytask("export", "configs/demo_cpu.yaml", "--checkpoint", str(run_dir / "checkpoints" / "latest"),
                     "--out", str(out), *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.split() == [str(out / "model.safetensors"), str(out / "model.json")]
    return out


def test_export_holds_the_trained_weights_and_what_rebuilds_the_model(trained, exported, tiny):
    run_dir, _, _ = trained
    spec = json.loads((exported / "model.json").read_text())
    trained_digest = json.loads((run_dir / "summary.json").read_text())["replica_digests"][0]
    weights = load_file(exported / "model.safetensors")
    assert weights_digest(weights) == trained_digest == spec["weights"]["sha256"]  # the weights the run ended with
    assert spec["checkpoint"]["step"] == STEPS and spec["checkpoint"]["backend"] == "ddp"
    assert spec["model"]["detections_per_image"] == 7 and spec["model"]["fpn_channels"] == 64
    space = tiny.label_space
    assert spec["label_space"] == space.outputs() and list(spec["label_space"]) == space.task_names
    assert spec["label_space"]["detection"] == space.classes["detection"] == spec["label_space"]["instance_mask"]
    assert [(t["name"], t["type"], t["boxes_from"]) for t in spec["tasks"]] == [
        (t.name, t.type, t.boxes_from) for t in space.tasks]
    schema = space.keypoint_schemas["keypoints"]
    assert list(spec["keypoints"]) == ["keypoints"] and spec["keypoints"]["keypoints"]["names"] == schema.names
    assert spec["keypoints"]["keypoints"]["sigmas"] == schema.sigmas and len(schema.sigmas) == len(schema.names)
    assert spec["num_classes"] == space.num_classes()
    assert spec["input"] == {"resize": "square", "image_size": 64, "max_size": None,  # how to resize for the model
                             "value_range": [0.0, 1.0], "channels": "RGB"}


def test_exported_model_predicts_what_the_checkpoint_predicts(trained, exported):
    run_dir, _, cfg = trained
    # What a user does in a plain process: README's snippet.
    spec = json.loads((exported / "model.json").read_text())
    rebuilt = build_model(ModelConfig(**spec["model"]), num_classes=spec["num_classes"])
    rebuilt.load_state_dict(load_file(exported / "model.safetensors"))
    rebuilt.eval()
    reference, _, _ = checkpoint_model(cfg, run_dir / "checkpoints" / "latest")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = rebuilt.predict(images), reference.predict(images)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert list(a) == list(b) == [t["name"] for t in spec["tasks"]]  # per task name
        assert len(a["detection"]["boxes"]) == 7  # every candidate kept, at most detections_per_image
        for task in a:
            assert sorted(a[task]) == sorted(b[task])
            for key in a[task]:
                assert torch.equal(a[task][key], b[task][key]), (task, key)


def test_predict_draws_every_image_and_writes_what_evaluation_scored(trained, tiny):
    run_dir, overrides, _ = trained
    raw = tiny.paths["tiny_instances"].parent / "raw"
    out = run_dir / "predict"
    proc = run_polytask("predict", "configs/demo_cpu.yaml", "--checkpoint", str(run_dir / "checkpoints" / "latest"),
                     str(raw / "tiny_instances" / "images"), str(raw / "tiny_classes"), "--out", str(out), *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 * NUM_IMAGES  # one each, though both sources name their files 000.png, ...
    for png in pngs:
        with Image.open(png) as image:
            assert len(image.convert("L").getcolors(maxcolors=256 * 256)) > 10  # drawn, not blank
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * NUM_IMAGES
    evaluation = run_dir / "eval" / f"step_{STEPS}"

    # Boxes and masks: the evaluation's results of each image, in the source's category ids.
    coco = json.loads((raw / "tiny_instances" / "annotations.json").read_text())
    image_ids = {image["file_name"]: image["id"] for image in coco["images"]}
    category_ids = {c["name"]: c["id"] for c in INSTANCE_CATEGORIES}
    bbox = json.loads((evaluation / "tiny_instances_bbox_results.json").read_text())
    segm = json.loads((evaluation / "tiny_instances_segm_results.json").read_text())
    compared = 0
    for line in lines:
        name = os.path.basename(line["file"])
        if "tiny_instances" not in line["file"]:
            continue
        image_id = image_ids[name]
        detections = line["detection"]["detections"]
        # The cascades: one per detection, in its order.
        masks, keypoints = line["instance_mask"], line["keypoints"]
        assert masks["boxes_from"] == keypoints["boxes_from"] == "detection"
        assert len(masks["segmentations"]) == len(keypoints["keypoints"]) == len(detections)
        # Evaluation scores only the classes the source annotates.
        ours = [(d, rle) for d, rle in zip(detections, masks["segmentations"]) if d["category"] in category_ids]
        assert sorted((category_ids[d["category"]], d["bbox"], d["score"]) for d, _ in ours) == sorted(
            (r["category_id"], r["bbox"], r["score"]) for r in bbox if r["image_id"] == image_id)
        assert sorted((d["score"], rle["counts"]) for d, rle in ours) == sorted(
            (r["score"], r["segmentation"]["counts"]) for r in segm if r["image_id"] == image_id)
        assert all(len(k) == 3 * len(tiny.label_space.keypoint_schemas["keypoints"].names) for k in keypoints["keypoints"])
        compared += len(ours)
    assert compared > 0

    # Classes: the evaluation's per-image top-5 with their probabilities.
    scored = {r["file_name"]: r["top5"] for r in map(json.loads, (evaluation / "tiny_classes_classification_predictions.jsonl").read_text().splitlines())}
    classified = {"/".join(line["file"].split("/")[-2:]): line["classification"]["top5"] for line in lines
                  if "tiny_classes" in line["file"]}
    assert classified == scored and len(scored) == NUM_IMAGES



def test_a_checkpoint_whose_classes_differ_from_the_config_is_refused_with_the_differences(trained, tiny):
    """The same heads' sizes with the sources in another order: the classes would swap
    silently. A source left out: fewer classes. Both are named, before any weight loads."""
    run_dir, overrides, _ = trained
    checkpoint = str(run_dir / "checkpoints" / "latest")
    swapped = ["tiny_people", *[s for s in SOURCES if s != "tiny_people"]]
    proc = run_polytask("export", "configs/demo_cpu.yaml", "--checkpoint", checkpoint, "--out", str(run_dir / "x1"),
                     *overrides, f"data.sources={sources_list(tiny.paths[s] for s in swapped)}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit this config's model and data sources" in proc.stderr
    assert "detection: the same names in another order (index 0: checkpoint 'box', config 'person')" in proc.stderr
    fewer = [s for s in SOURCES if s != "tiny_classes"]
    proc = run_polytask("export", "configs/demo_cpu.yaml", "--checkpoint", checkpoint, "--out", str(run_dir / "x2"),
                     *overrides, f"data.sources={sources_list(tiny.paths[s] for s in fewer)}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert f"classification: only in the checkpoint {meta['outputs']['classification']}" in proc.stderr
    assert not (run_dir / "x1").exists() and not (run_dir / "x2").exists()


def test_a_checkpoint_trained_with_another_box_activation_is_refused_and_an_older_export_is_relu(trained, exported):
    """The activation changes no parameter shape: only meta.json and model.json tell it.
    Loading with the other one would move every box; a checkpoint or export from before
    the setting was trained with torchvision's ReLU."""
    run_dir, overrides, _ = trained
    checkpoint = str(run_dir / "checkpoints" / "latest")
    proc = run_polytask("export", "configs/demo_cpu.yaml", "--checkpoint", checkpoint, "--out", str(run_dir / "x3"),
                        *overrides, "model.fcos_box_activation=relu")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("model.fcos_box_activation: the checkpoint's boxes were trained with 'softplus', the config has 'relu'; "
            "set model.fcos_box_activation=softplus") in proc.stderr
    assert not (run_dir / "x3").exists()

    from trainer.export import load_exported_model
    spec = json.loads((exported / "model.json").read_text())
    assert spec["model"]["fcos_box_activation"] == "softplus"
    del spec["model"]["fcos_box_activation"]  # as an export from before the setting
    (exported / "model.json").write_text(json.dumps(spec))
    try:
        model, _ = load_exported_model(exported)
        assert model.cfg.fcos_box_activation == "relu"
    finally:
        spec["model"]["fcos_box_activation"] = "softplus"
        (exported / "model.json").write_text(json.dumps(spec))
