"""Named tasks end to end: per-dataset detection heads over one backbone, each source mapped
to its own tasks, through a real 2-rank run, its evaluation, a resume, a refused resume
with other tasks, and `polytask predict`."""
import json
import subprocess
import sys

import pytest
import yaml

from data_pipelines.demo.shards import demo_source_paths
from tests.conftest import REPO, run_polytask

STEPS = 4
TASKS = {
    "shapes": "detection",
    "shape_masks": {"type": "instance_mask", "boxes_from": "shapes"},
    "figures": "detection",
    "pose": {"type": "keypoints", "boxes_from": "figures"},
    "regions": "semantic",
    "shape_class": "classification",
}
# Per source: its annotation type -> task; the semantic and classification sources are
# left to the default (the only task of their type).
MAPPINGS = {
    "shapes_instances": {"detection": "shapes", "instance_mask": "shape_masks"},
    "shapes_keypoints": {"detection": "figures", "keypoints": "pose"},
}


def _sources(shards, split: str) -> list[dict]:
    out = []
    for path in demo_source_paths(shards, split=split):
        name = path.rstrip("/").split("/")[-1]
        out.append({"path": path, **({"tasks": MAPPINGS[name]} if name in MAPPINGS else {})})
    return out


def _launch(config, *overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher", "launch", str(config), "--nproc-per-node", "2", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def named_run(demo_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    cfg = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    cfg["run"]["dir"] = str(root / "run")
    cfg["model"]["tasks"] = TASKS
    cfg["data"]["sources"] = _sources(demo_sources, "train")
    cfg["eval"]["sources"] = _sources(demo_sources, "val")
    cfg["eval"]["max_images"] = 4
    cfg["eval"]["best_metric"] = "val/shapes_keypoints/keypoints/AP"
    cfg["trainer"].update(max_steps=STEPS, log_every=2)
    cfg["checkpoint"]["every"] = 2
    config = root / "named.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = _launch(config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return config, root / "run", proc


def test_each_source_trains_its_own_tasks(named_run):
    _, run_dir, proc = named_run
    # The start-up coverage: per source, its tasks by name (per-dataset heads: all classes).
    assert "shapes_instances  shapes 3/3, shape_masks 3/3" in proc.stderr
    assert "shapes_keypoints  figures 1/1, pose 7/7" in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train] == [2, 4]
    for task in TASKS:
        assert all(f"weight/{task}" in r for r in train), task
        assert any(r.get(f"loss/{task}", 0) > 0 for r in train), task
    assert not any("loss/detection" in r for r in rows)
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert [(t["name"], t["type"], t["boxes_from"]) for t in meta["tasks"]] == [
        ("shapes", "detection", None), ("shape_masks", "instance_mask", "shapes"), ("figures", "detection", None),
        ("pose", "keypoints", "figures"), ("regions", "semantic", None), ("shape_class", "classification", None)]
    assert meta["outputs"]["shapes"] == meta["outputs"]["shape_masks"] == ["circle", "square", "triangle"]
    assert meta["outputs"]["figures"] == ["figure"] and len(meta["outputs"]["pose"]) == 7


def test_each_source_is_evaluated_on_its_tasks(named_run):
    _, run_dir, _ = named_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in rows if "eval/images" in r]
    for key in ("val/shapes_instances/bbox/AP", "val/shapes_instances/segm/AP", "val/shapes_keypoints/bbox/AP",
                "val/shapes_keypoints/keypoints/AP", "val/shapes_semantic/semantic/mIoU",
                "val/shapes_classes/shape_class/top1"):  # classification: by task name (a source may have several)
        assert key in evaluation, key
    # Each source's boxes are its own task's: the keypoint source's results hold only its category.
    results = json.loads((run_dir / "eval" / f"step_{STEPS}" / "shapes_keypoints_bbox_results.json").read_text())
    assert {r["category_id"] for r in results} <= {1}


def test_resume_and_a_refused_resume_with_other_tasks(named_run):
    config, run_dir, _ = named_run
    resumed = _launch(config, f"trainer.max_steps={STEPS + 2}")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS}'} at step {STEPS}" in resumed.stderr
    renamed = {("people" if k == "figures" else k): v for k, v in TASKS.items()}
    renamed["pose"] = {"type": "keypoints", "boxes_from": "people"}
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["tasks"] = renamed
    for section in ("data", "eval"):
        for source in cfg[section]["sources"]:
            if source.get("tasks", {}).get("detection") == "figures":
                source["tasks"]["detection"] = "people"
    other = config.with_name("renamed.yaml")
    other.write_text(yaml.safe_dump(cfg, sort_keys=False))
    refused = _launch(other, f"trainer.max_steps={STEPS + 4}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "does not fit this config's model and data sources" in refused.stderr
    assert "figures: only in the checkpoint ['figure']" in refused.stderr
    assert "people: only in the config ['figure']" in refused.stderr


def test_predict_writes_each_task_by_name(named_run, demo_sources):
    config, run_dir, _ = named_run
    # make_demo_shards keeps the raw images beside the shards.
    image = sorted((demo_sources.parent / "raw" / "shapes_keypoints" / "val" / "images").iterdir())[0]
    out = run_dir / "predict"
    proc = run_polytask("predict", str(config), "--checkpoint", str(run_dir / "checkpoints" / "latest"),
                        str(image), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    (line,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [k for k in line if k not in ("file", "height", "width")] == list(TASKS)
    assert line["pose"]["boxes_from"] == "figures"
    assert len(line["pose"]["keypoints"]) == len(line["figures"]["detections"])
    assert all(d["category"] == "figure" for d in line["figures"]["detections"])
    assert {d["category"] for d in line["shapes"]["detections"]} <= {"circle", "square", "triangle"}
