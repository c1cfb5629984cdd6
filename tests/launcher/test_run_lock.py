"""One job per run directory (launcher/run_lock.py): a second launch fails naming the first
one's host and pid; a dead job's lock (same host, pid gone; or the same Slurm job requeued)
is taken over, by exactly one of several launchers racing for it."""
import json
import os
import socket
import subprocess
import sys

import pytest

from launcher.cli import main
from launcher.run_lock import LOCK_NAME, LockOwner, RunDirLocked, RunLock
from tests.conftest import REPO, demo_source_overrides

DEMO = str(REPO / "configs" / "demo_cpu.yaml")
HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, **fields):
    owner = {"host": HOST, "pid": os.getpid(), "pid_start": None, "slurm_job_id": None, "started": 0.0, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(owner))


def test_second_launch_fails_naming_the_first_before_spawning(demo_sources, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock.acquire(run_dir):  # held by this (live) process, as by a running launcher
        code = main(["launch", DEMO, "--nproc-per-node", "2", *demo_source_overrides(demo_sources),
                     "eval.sources=[]", "eval.best_metric=null", f"run.dir={run_dir}"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"in use by another launch (host {HOST} pid {os.getpid()}" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no rank wrote anything
    assert not (run_dir / LOCK_NAME).exists()  # released


def test_a_dead_holders_lock_on_this_host_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    with RunLock.acquire(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid() == lock.owner.pid


def test_a_live_holder_and_another_hosts_holder_are_honoured(tmp_path):
    _write_lock(tmp_path, pid=os.getpid())
    with pytest.raises(RunDirLocked, match=f"host {HOST} pid {os.getpid()}"):
        RunLock.acquire(tmp_path, owner=_other_owner())
    _write_lock(tmp_path, host="node-a", pid=_dead_pid(), slurm_job_id="77")
    with pytest.raises(RunDirLocked, match="host node-a pid .*Slurm job 77"):
        RunLock.acquire(tmp_path, owner=LockOwner.current({"SLURM_JOB_ID": "78"}))


def _other_owner() -> LockOwner:
    # This host, another (imaginary) pid: the file's holder is this live process.
    return LockOwner(host=HOST, pid=os.getpid() + 1_000_000, pid_start=None, slurm_job_id=None, started=1.0)


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_any_host(tmp_path):
    _write_lock(tmp_path, host="node-a", pid=os.getpid(), slurm_job_id="77")
    with RunLock.acquire(tmp_path, owner=LockOwner.current({"SLURM_JOB_ID": "77"})):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == HOST


def test_launchers_racing_for_a_stale_lock_leave_exactly_one_holder(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    code = ("import sys, time\nfrom launcher.run_lock import RunLock, RunDirLocked\n"
            "try:\n    lock = RunLock.acquire(sys.argv[1])\nexcept RunDirLocked:\n    print('refused')\n"
            "else:\n    print('won', flush=True)\n    time.sleep(3)\n    lock.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes
