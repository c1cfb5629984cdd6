"""kill -9 of the launcher's process group: torchrun starts each rank in a session of its
own, so only the parent-death signals (launcher/parent_death.py) stop the ranks."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO, demo_source_overrides


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ranks(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in launcher.children(recursive=True):
        try:
            # A rank is a child of torchrun's agent (its data workers, forked, share its cmdline).
            if "torch.distributed.run" in p.parent().cmdline() and "train" in p.cmdline():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_ranks_die_with_their_launcher(demo_sources, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*demo_source_overrides(demo_sources), f"run.dir={run_dir}", "trainer.max_steps=100000",
                 "eval.sources=[]", "eval.best_metric=null", "wandb.mode=disabled", "data.num_workers=1",
                 "data.readers_per_rank=1", "data.transforms.image_size=64"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node=2", *overrides],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    everything: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # Training has started once rank 0 wrote the config (after the process group formed).
        while not (run_dir / "config.yaml").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        ranks = _ranks(psutil.Process(launcher.pid))
        assert len(ranks) == 2
        everything += [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]  # + data workers
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and torchrun's agent, not the ranks' sessions
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 15  # data workers check on their rank every 5 s
        while not all(_gone(pid) for pid in everything) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [pid for pid in everything if not _gone(pid)]
        assert not [r.pid for r in ranks if r.pid in survivors], "ranks outlived their launcher"
        assert not survivors, f"processes outlived their launcher: {survivors}"
    finally:  # whatever survived (a failing test), by pid
        launcher.kill()
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
