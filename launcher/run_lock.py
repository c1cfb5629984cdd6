"""One job per run directory: ``<run.dir>/run.lock``, taken by the launcher before torchrun.

Two launches into one ``run.dir`` used to both run, interleaving their audit trails,
metrics and checkpoints. The lock is a file created with ``O_CREAT | O_EXCL`` holding JSON
``{host, pid, pid_start, slurm_job_id, started}``, not an ``fcntl``/``flock`` lock: run
directories live on shared filesystems (NFS, Lustre, GPFS) where those locks are node-local
or unsupported on many clusters (Lustre without ``-o flock``), so two nodes could both hold
one. An exclusive create is atomic there. Its cost is that a killed holder leaves the file
behind, hence the stale rules of :func:`stale_reason`.

Multi-node jobs: only the launcher of node rank 0 takes it (see ``launcher/cli.py``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "run.lock"
UNWRITTEN_GRACE_S = 1.0  # a lock file that is still not valid JSON after this is a dead holder's


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory."""


@dataclass(frozen=True, kw_only=True)
class LockOwner:
    host: str
    pid: int
    pid_start: int | None  # the process's start time in clock ticks since boot (pid reuse)
    slurm_job_id: str | None
    started: float  # time.time()

    @classmethod
    def current(cls, env: Mapping[str, str] = os.environ) -> LockOwner:
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                   slurm_job_id=env.get("SLURM_JOB_ID") or None, started=time.time())

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid}{job}, since {since}"


class RunLock:
    """``with RunLock.acquire(run_dir): ...``; released (the file removed, if still ours) on exit."""

    def __init__(self, path: Path, owner: LockOwner) -> None:
        self.path = path
        self.owner = owner

    @classmethod
    def acquire(cls, run_dir: str | Path, *, owner: LockOwner | None = None) -> RunLock:
        """Take the lock, taking over a stale one. Raises :class:`RunDirLocked` naming the
        holder when a live job (or one we cannot check, on another host) has it."""
        owner = owner or LockOwner.current()
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(owner.__dict__)
        for _ in range(20):  # a retry follows a take-over (which another launcher may win) or a wait
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = _read(path)
                if held is None:
                    continue  # removed meanwhile: try again
                holder, held_text = held
                if holder is None:
                    if time.time() - path.stat().st_mtime < UNWRITTEN_GRACE_S:
                        time.sleep(0.1)  # just created, its JSON not written yet
                        continue
                    # Still unreadable: its holder died between create and write.
                    _take_over(path, held_text)
                    continue
                if stale_reason(holder, owner) is None:
                    raise RunDirLocked(
                        f"{Path(run_dir).absolute()}: in use by another launch ({holder.describe()}); "
                        f"wait for it, pick another run.dir, or if that job is dead delete {path}"
                    ) from None
                _take_over(path, held_text)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, owner)
        raise RunDirLocked(f"{path}: could not take the lock; other launches keep taking it")

    def release(self) -> None:
        held = _read(self.path)
        if held is not None and held[0] == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def stale_reason(holder: LockOwner, me: LockOwner) -> str | None:
    """Why ``holder``'s lock may be taken over by ``me``, or None while it may be live.

    - the same Slurm job id: an earlier instance of this very job (a requeue; Slurm runs one
      instance of a job at a time), wherever it ran;
    - the same host and its pid is gone, or now belongs to a process started later.
    A lock from another host cannot be checked from here, so it is honoured.
    """
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return f"Slurm job {holder.slurm_job_id} requeued"
    if holder.host != me.host:
        return None
    if not pid_alive(holder.pid):
        return f"pid {holder.pid} is gone"
    if holder.pid_start is not None and _pid_start(holder.pid) not in (None, holder.pid_start):
        return f"pid {holder.pid} now belongs to another process"
    return None


def _take_over(path: Path, stale_text: str) -> None:
    """Remove the stale lock ``stale_text``, and only it: two launchers that both found it
    stale race here. Renaming is atomic, so one of them moves it aside; should the slower
    one move a fresh lock (the winner's) instead, it sees other contents and puts it back."""
    aside = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if aside.read_text() != stale_text:
            try:
                os.link(aside, path)  # fails if a third launcher has taken the place meanwhile
            except FileExistsError:
                pass
    finally:
        aside.unlink(missing_ok=True)


def _read(path: Path) -> tuple[LockOwner | None, str] | None:
    """The holder and the file's text (holder None: not valid lock JSON); None: no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LockOwner(**json.loads(text)), text
    except (ValueError, TypeError):
        return None, text


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone and not a zombie (killed, waiting to be reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _pid_start(pid) is not None or not os.path.isdir("/proc")


def _pid_start(pid: int) -> int | None:
    """Start time of ``pid`` (field 22 of /proc/<pid>/stat); None for a zombie, a missing
    process or where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # killed, waiting to be reaped: as good as gone
        return None
    return int(fields[19])
