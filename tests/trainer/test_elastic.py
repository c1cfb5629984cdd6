"""Elastic restart: a rank killed with SIGKILL under `--max-restarts 1` makes torchrun restart
the group, which resumes from the latest checkpoint and completes the run."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO, demo_source_overrides

STEPS = 8


def _ranks(launcher_pid):
    """The rank processes: children of torchrun's agent (their DataLoader workers are one
    level further down)."""
    (agent,) = [p for p in psutil.Process(launcher_pid).children() if "torch.distributed.run" in p.cmdline()]
    return agent.children()


def test_killed_rank_restarts_from_latest_checkpoint(demo_sources, tmp_path):
    run_dir = tmp_path / "run"
    overrides = demo_source_overrides(demo_sources)
    overrides += [f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                  "checkpoint.every=3", "wandb.mode=disabled", "eval.sources=[]", "eval.best_metric=null", "trainer.dist_timeout_s=60"]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node=2",
           "--max-restarts=1", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victims = _ranks(proc.pid)
    assert len(victims) == 2, [p.cmdline() for p in victims]
    victims[1].send_signal(signal.SIGKILL)  # one rank dies; the agent restarts the group
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    assert "resumed from" in out, out[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["replicas_in_sync"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, STEPS + 1))
