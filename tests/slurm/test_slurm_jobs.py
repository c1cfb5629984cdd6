"""``sbatch slurm/train.sbatch`` on a real Slurm cluster (two slurmd on this machine):
1 and 2 nodes, checkpoint + requeue + exact resume on USR1 (sent by hand, and sent by
Slurm before the time limit), and failures that are not requeued.

Every run trains the same STEPS steps on the same data with 2 ranks, so each one's final
parameters, per-step losses and sample audit trail can be compared with one uninterrupted
run (``reference``, 2 nodes x 1 rank), bit for bit: 1 node x 2 ranks gives the same two
ranks. The 1 node x 2 ranks layout runs in the time-limit test.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, demo_source_overrides
from tests.slurm.cluster import ENDED, SlurmCluster

STEPS = 6
SBATCH = REPO / "slurm" / "train.sbatch"
# The polytask of the interpreter running the tests, whatever PATH says.
POLYTASK = Path(sys.executable).parent / "polytask"
JOB_TIMEOUT = 300  # s; a job here takes 15-60 s


def _overrides(demo_sources: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *demo_source_overrides(demo_sources),
        f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
        # Only the final checkpoint, plus the one made on request: a resume can only come from it.
        "checkpoint.every=0", "data.audit=true", "eval.sources=[]", "eval.best_metric=null",
        "wandb.mode=disabled", *extra,
    ]


def _submit(cluster: SlurmCluster, out_dir: Path, sbatch_options: list[str], script_args: list[str]) -> str:
    return cluster.sbatch([f"--output={out_dir}/slurm-%j.out", *sbatch_options, str(SBATCH), *script_args],
                          cwd=REPO, env={"POLYTASK": str(POLYTASK)})


def _log(run_dir: Path, job: str) -> str:
    """The job's Slurm output, through the link the batch script made in the run directory."""
    return (run_dir / f"slurm-{job}.out").read_text(errors="replace")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _audit(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit" / f"rank_{rank}.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, demo_sources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted job on 2 nodes x 1 rank: the run the requeued ones must match.
    Its wandb.name goes through sbatch, the batch shell, srun, the launcher and torchrun
    to the ranks: spaces, quotes and shell syntax must arrive byte for byte."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run dir"
    name = """it's a "quoted" run; $(touch /tmp/polytask-injected) `id` && *"""
    job = _submit(slurm_cluster, tmp, ["--nodes=2"],
                  ["configs/demo_cpu.yaml", *_overrides(demo_sources, run_dir, f"wandb.name={name}")])
    return {"job": job, "info": slurm_cluster.wait_for_end(job), "run_dir": run_dir, "name": name}


def _assert_complete(run_dir: Path, info: dict[str, str], log: str) -> dict:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    summary = _summary(run_dir)
    assert summary["step"] == STEPS and summary["world_size"] == 2 and summary["replicas_in_sync"]
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step_{STEPS}"
    assert [row["step"] for row in _metrics(run_dir)] == list(range(1, STEPS + 1))  # each step once
    assert not (run_dir / "preempt.request").exists() and not (run_dir / "preempt.done").exists()
    return summary


def _assert_resumed_exactly(run_dir: Path, reference: dict, log: str) -> int:
    """One requeue, resumed from the checkpoint made on request; returns its step. Per-step
    losses, samples and final parameters are those of the uninterrupted run, bit for bit."""
    found = re.findall(r"checkpointed at step (\d+) on request", log)
    assert found, log[-6000:]
    step = int(found[0])
    assert 1 <= step < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{step} at step {step}" in log
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert re.search(r"train\.sbatch: requeueing job \d+", log)

    ref_dir = reference["run_dir"]
    ours, theirs = _metrics(run_dir), _metrics(ref_dir)
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if k.startswith("loss/")} == \
               {k: v for k, v in b.items() if k.startswith("loss/")}, f"step {a['step']}"
    # Which instance logged each step: the first one up to the checkpoint, then the requeued one.
    assert [row["slurm/restart_count"] for row in ours] == [0] * step + [1] * (STEPS - step)
    for rank in (0, 1):  # no sample lost or repeated: the same keys at the same steps
        assert _audit(run_dir, rank) == _audit(ref_dir, rank)
    assert _summary(run_dir)["replica_digests"] == _summary(ref_dir)["replica_digests"]
    return step


def test_bad_config_fails_fast_with_the_error_in_the_output_and_is_not_requeued(slurm_cluster, tmp_path):
    started = time.time()
    job = _submit(slurm_cluster, tmp_path, [], ["configs/demo_cpu.yaml", f"run.dir={tmp_path / 'run'}",
                                                "trainer.max_steps=five"])
    info = slurm_cluster.wait_for_end(job)
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    assert "polytask: error: configs/demo_cpu.yaml: trainer.max_steps: expected an integer, got 'five'" in output
    assert "not started, not requeued" in output
    assert not (tmp_path / "run").exists()  # no rank ever started
    assert time.time() - started < 60, "a bad config must fail in seconds"


def test_two_nodes_one_rank_each(reference):
    run_dir, job, info = reference["run_dir"], reference["job"], reference["info"]
    log = _log(run_dir, job)
    _assert_complete(run_dir, info, log)
    assert info["Restarts"] == "0"
    assert "node node1 (SLURM_NODEID 0 of 2): 1 process(es)" in log
    assert "node node2 (SLURM_NODEID 1 of 2): 1 process(es)" in log
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["wandb"]["name"] == reference["name"]


def test_usr1_mid_run_checkpoints_requeues_and_resumes_exactly(slurm_cluster, demo_sources, tmp_path, reference):
    """`scancel --signal=USR1 --batch` after step 2, on 2 nodes, with W&B (offline)."""
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, ["--nodes=2"],
                  ["configs/demo_cpu.yaml", *_overrides(demo_sources, run_dir, "wandb.mode=offline")])
    deadline = time.time() + JOB_TIMEOUT
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and slurm_cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, \
            slurm_cluster.job(job)
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm_cluster.wait_for_end(job, restarts=1)
    log = _log(run_dir, job)
    summary = _assert_complete(run_dir, info, log)
    assert info["Restarts"] == "1"
    step = _assert_resumed_exactly(run_dir, reference, log)
    # One W&B run across the requeue: the id saved with the checkpoint is the one continued.
    run_id = json.loads((run_dir / "checkpoints" / f"step_{step}" / "meta.json").read_text())["wandb_run_id"]
    assert run_id and summary["wandb_run_id"] == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {d.name.rsplit("-", 1)[1] for d in offline} == {run_id}


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm_cluster, demo_sources, tmp_path, reference):
    """Nobody signals by hand: `--time=1` and the script's own `--signal=B:USR1@120`, on
    1 node x 2 ranks: one per (pretend) GPU Slurm allocated, no --nproc-per-node."""
    # Slurm sends the warning at its next time-limit check (every 30 s) once the time left
    # is within reach of @120: at the first check after the start. Submitting 3-8 s before
    # a check makes it come while the job starts up, on a slow machine or a fast one: the
    # batch shell holds it until the run directory is known, the ranks stop after a step.
    next_check = slurm_cluster.next_time_limit_check()
    while next_check - time.time() < 3:
        next_check += 30
    time.sleep(max(0.0, next_check - 8 - time.time()))
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, ["--nodes=1", "--gpus-per-node=2", "--time=1"],
                  ["configs/demo_cpu.yaml", *_overrides(demo_sources, run_dir)])
    deadline = time.time() + JOB_TIMEOUT
    while int(slurm_cluster.job(job)["Restarts"]) < 1:
        assert time.time() < deadline and slurm_cluster.job(job)["JobState"] not in ENDED, slurm_cluster.job(job)
        time.sleep(0.25)
    # The requeued job would get the same warning again; give it the time it needs instead.
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
    info = slurm_cluster.wait_for_end(job, restarts=1)
    log = _log(run_dir, job)
    _assert_complete(run_dir, info, log)
    assert info["Restarts"] == "1"
    assert "node node1 (SLURM_NODEID 0 of 1): 2 process(es)" in log
    assert "USR1" in log
    _assert_resumed_exactly(run_dir, reference, log)


def test_failed_training_is_not_requeued_even_after_usr1(slurm_cluster, demo_sources, tmp_path):
    """Ranks that fail (here: the checkpoint to resume from does not exist) end the job
    FAILED with srun's status, not requeued, though a USR1 asked for a checkpoint."""
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, ["--nodes=1"],
                  ["configs/demo_cpu.yaml", *_overrides(demo_sources, run_dir, f"checkpoint.resume={tmp_path}/none")])
    log_file = run_dir / f"slurm-{job}.out"
    deadline = time.time() + JOB_TIMEOUT
    while not (log_file.exists() and "train.sbatch: job" in log_file.read_text()):
        assert time.time() < deadline and slurm_cluster.job(job)["JobState"] not in ENDED, slurm_cluster.job(job)
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm_cluster.wait_for_end(job)
    log = _log(run_dir, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{log[-4000:]}"
    assert "USR1: asking the ranks to checkpoint" in log
    assert "not a complete polytask checkpoint" in log
    assert "training failed (srun exit status" in log and "not requeued" in log
    assert not (run_dir / "preempt.request").exists() and not (run_dir / "preempt.done").exists()
