"""Processes that die with their parent: the torchrun agent with the launcher, each rank
with the torchrun agent.

torchrun starts every rank in a session of its own, so ``kill -9`` of the launcher's
process group killed the launcher and the agent and left the ranks running as orphans that
kept writing into the run directory (and overlapped a relaunch). Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) is delivered by the kernel even when the parent is killed by
SIGKILL; an orphan is then reaped by whichever process adopts it (init or a subreaper).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from launcher.run_lock import pid_alive

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The launcher's pid, for its grandchildren (the ranks): see die_with_parent.
LAUNCHER_PID_ENV = "POLYTASK_LAUNCHER_PID"


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only;
    False elsewhere). Async-signal-safe enough for a ``preexec_fn``: one libc call."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Called first thing in each rank (``polytask train`` / ``eval``): die with the torchrun
    agent. SIGKILL: with its agent gone a rank's job is dead, and a rank blocked in a
    collective must not linger.

    The signal only covers a parent that dies after this call; a launcher killed while the
    rank was starting is caught by looking for it (the agent dies with the launcher)."""
    set_parent_death_signal(sig)
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and not pid_alive(int(launcher)):
        os.kill(os.getpid(), sig)


def torchrun_preexec(launcher_pid: int) -> None:
    """``preexec_fn`` of the torchrun agent: SIGTERM when the launcher dies, which the agent
    handles by stopping its ranks (and each rank also dies with the agent)."""
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != launcher_pid:  # the launcher died between fork and prctl
        os._exit(1)
