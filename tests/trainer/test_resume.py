"""Exact resume: a 2-rank run killed with SIGKILL after a checkpoint and resumed ends with
the same parameters and the same per-step losses as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

STEPS = 8
SOURCES = ["shapes_instances", "shapes_keypoints", "shapes_semantic", "shapes_classes"]


def _launch(demo_sources, run_dir, *extra, nproc=2):
    overrides = [f"data.sources.{i}.path={demo_sources / 'train' / s}" for i, s in enumerate(SOURCES)]
    overrides += [f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                  "checkpoint.every=3", "checkpoint.keep_last=5", "wandb.mode=disabled", "data.audit=true", "eval.sources=[]", "eval.best_metric=null", *extra]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", f"--nproc-per-node={nproc}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_tree(pid):
    """SIGKILL the launcher, torchrun's agent and the ranks (which torchrun starts in
    sessions of their own, so a process-group kill would miss them)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def _audit(run_dir, rank):
    lines = [json.loads(line) for line in (run_dir / "audit" / f"rank_{rank}.jsonl").read_text().splitlines()]
    return {line["step"]: line["keys"] for line in lines}


def _losses_by_step(run_dir):
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if k.startswith("loss/")}  # last one wins
    return rows


BACKENDS = {
    "ddp": ["trainer.backend=ddp"],
    "ddp_async_save": ["trainer.backend=ddp", "checkpoint.async_save=true"],
    "zero2": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_killed_and_resumed_run_matches_uninterrupted(backend, demo_sources, tmp_path):
    options = BACKENDS[backend]
    uninterrupted = tmp_path / "full"
    proc = _launch(demo_sources, uninterrupted, *options)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]

    run_dir = tmp_path / "run"
    proc = _launch(demo_sources, run_dir, *options)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.communicate(timeout=60)
    checkpoint = latest.resolve()
    killed_at = int(checkpoint.name.split("_")[1])
    assert killed_at < STEPS, "the run finished before it could be killed"

    resumed = _launch(demo_sources, run_dir, *options)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-6000:]
    assert f"resumed from {checkpoint} at step {killed_at}" in out

    full, again = _losses_by_step(uninterrupted), _losses_by_step(run_dir)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(killed_at + 1, STEPS + 1):
        assert again[step] == full[step], f"step {step}: {again[step]} != {full[step]}"  # bitwise
    # The audit trail: per step and rank, the same samples as the uninterrupted run (the
    # killed leg may have logged steps past its checkpoint; the resumed run's lines win).
    for rank in (0, 1):
        assert _audit(run_dir, rank) == _audit(uninterrupted, rank)
    a = json.loads((uninterrupted / "summary.json").read_text())["replica_digests"]
    b = json.loads((run_dir / "summary.json").read_text())["replica_digests"]
    assert a == b  # identical parameters, bit for bit, on both ranks


def test_resume_on_another_world_size(demo_sources, tmp_path):
    """2 ranks -> 1 rank -> 2 ranks (DDP): model and optimizer reshard, stream positions
    are remapped, training continues to the end with replicas in sync."""
    run_dir = tmp_path / "run"
    for nproc, steps in ((2, 3), (1, 5), (2, STEPS)):
        proc = _launch(demo_sources, run_dir, f"trainer.max_steps={steps}", nproc=nproc)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-6000:]
        if steps != 3:
            assert "data positions remapped" in out, out[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["step"] == steps and summary["world_size"] == nproc and summary["replicas_in_sync"]
    lines = [json.loads(line) for r in (0, 1) for line in (run_dir / "audit" / f"rank_{r}.jsonl").read_text().splitlines()]
    per_step = {}
    for line in lines:
        per_step.setdefault(line["step"], []).extend(line["keys"])
    batch = 2  # data.batch_size of the demo config
    assert {s: len(k) for s, k in per_step.items()} == {
        s: batch * (1 if 3 < s <= 5 else 2) for s in range(1, STEPS + 1)
    }
