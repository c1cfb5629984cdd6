"""A real 2-rank run of the demo config through `polytask launch` (torchrun, gloo)."""
import json
import subprocess
import sys

import pytest
import yaml

from data_pipelines.schema import TASK_TYPES
from data_pipelines.demo.synthetic import DEMO_TASKS
from tests.conftest import REPO, demo_source_overrides
from trainer.wandb_records import find_run_file, read_history

STEPS = 6


@pytest.fixture(scope="module")
def demo_run(demo_sources, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [*demo_source_overrides(demo_sources), *demo_source_overrides(demo_sources, split="val", section="eval")]
    overrides += [f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every=2", "data.num_workers=1"]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return run_dir, proc


def test_both_ranks_ran_and_replicas_are_identical(demo_run):
    run_dir, proc = demo_run
    assert "[rank 0]" in proc.stderr and "[rank 1]" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 2
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["replicas_in_sync"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert summary["git_commit"] == head


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "lr" in r]
    evaluation = [r for r in rows if "eval/images" in r]
    assert len(train) + len(evaluation) == len(rows)
    return train, evaluation


def test_metrics_jsonl_has_every_task(demo_run):
    run_dir, _ = demo_run
    rows, _ = _rows(run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for task in TASK_TYPES:
        assert all(f"weight/{task}" in r for r in rows)
        losses = [r[f"loss/{task}"] for r in rows if f"loss/{task}" in r]
        assert losses and all(v > 0 and v == v for v in losses), task
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == STEPS


def test_total_loss_and_per_source_throughput_add_up(demo_run):
    run_dir, _ = demo_run
    rows, _ = _rows(run_dir)
    for r in rows:
        # static weights: the total is the weighted sum of the logged per-task means
        expected = sum(r[f"weight/{t}"] * r.get(f"loss/{t}", 0.0) for t in TASK_TYPES)
        assert r["loss/total"] == pytest.approx(expected, rel=1e-5)
        per_source = [r[f"throughput/{s}/images_per_s"] for s in DEMO_TASKS]
        assert all(v >= 0 for v in per_source) and r["throughput/images_per_s"] > 0
        assert sum(per_source) == pytest.approx(r["throughput/images_per_s"], rel=1e-6)


def test_offline_wandb_run_holds_the_same_losses(demo_run):
    run_dir, _ = demo_run
    history = read_history(find_run_file(run_dir))
    rows, evaluation = _rows(run_dir)
    train_history = [h for h in history if "lr" in h]
    assert [h["_step"] for h in train_history] == [r["step"] for r in rows]
    assert any("val/shapes_instances/bbox/AP" in h for h in history)
    for h, r in zip(train_history, rows):
        for key, value in r.items():
            if key.startswith("loss/"):
                assert h[key] == pytest.approx(value), key


def test_end_of_run_evaluation_is_logged_and_tracks_the_best_checkpoint(demo_run):
    run_dir, _ = demo_run
    _, evaluation = _rows(run_dir)
    (row,) = evaluation
    assert row["step"] == STEPS and row["eval/images"] == 4 * 8  # 8 val images per demo source
    for key in ("val/shapes_instances/bbox/AP", "val/shapes_keypoints/keypoints/AP",
                "val/shapes_semantic/semantic/mIoU", "val/shapes_classes/classification/top1"):
        assert 0.0 <= row[key] <= 1.0, key
    assert (run_dir / "eval" / f"step_{STEPS}" / "summary.json").is_file()
    assert (run_dir / "checkpoints" / "best").resolve().name == f"step_{STEPS}"


def test_final_checkpoint_is_sharded_and_latest(demo_run):
    run_dir, _ = demo_run
    latest = (run_dir / "checkpoints" / "latest").resolve()
    assert latest.name == f"step_{STEPS}"
    assert sorted(p.name for p in latest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["wandb_run_id"]
