"""A real, private Slurm cluster on this machine for the tests: munged, slurmctld and two
slurmd daemons playing two nodes (``node1``, ``node2``) on 127.0.0.1, each with 2 CPUs and
2 pretend GPUs.

Everything lives under one directory (config, munge key and socket, state, spool, logs,
pid files); clients find the cluster through ``SLURM_CONF``, so a Slurm installation the
machine may already have is left alone. The daemons run in the foreground as our own
children (``-D``/``-F``): teardown stops exactly the processes we started, by pid.

What mattered to make it work here is measured in ``shared/env-notes.md`` (Slurm section);
the comments below say why each unusual setting is there.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo"]
NODES = ["node1", "node2"]
CPUS_PER_NODE = 2
GPUS_PER_NODE = 2
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def ensure_slurm_installed() -> str | None:
    """Install Debian's Slurm and munge when missing. Returns None when they are there,
    else the reason they cannot be (the caller skips with it)."""
    if all(_which(c) for c in COMMANDS):
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed and installing it needs root (apt-get install {' '.join(PACKAGES)})"
    if not _which("apt-get"):
        return "Slurm is not installed and this machine has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return f"cannot install Slurm ({' '.join(cmd[:2])} failed: {tail[0]})"
    missing = [c for c in COMMANDS if not _which(c)]
    return f"Slurm installed but {missing} not found" if missing else None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        # Without the caller's own Slurm job variables, if any: they must not leak into our jobs.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env.update(SLURM_CONF=str(self.conf), PATH=_SEARCH_PATH)

    # --- start / stop -----------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        self._start_munged()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
        # Beside slurm.conf, where Slurm looks for it. Slurm drops a GPU without a character
        # device; links to /dev/null stand in for /dev/nvidia<i>.
        (self.root / "dev").mkdir(exist_ok=True)
        for i in range(GPUS_PER_NODE):
            (self.root / "dev" / f"nvidia{i}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(f"Name=gpu File={self.root}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n")
        # -i: ignore state files (there are none: a fresh directory, but say so explicitly).
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld to answer")
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._nodes_idle, timeout, "both nodes to be idle")

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.root / "munge"
        # --force: munged otherwise refuses a socket directory other users cannot enter.
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--log-file={m / 'munged.log'}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(self.munge_socket.exists, 20, "munged's socket")

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
            for n, p in zip(NODES, node_ports)
        )
        return f"""\
ClusterName=polytasktest
# Job ids (and so the jobs' rendezvous ports, 20000 + id % 10000) differ between clusters
# that run on one machine at the same time.
FirstJobId={random.randrange(1, 9000)}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
# Our own munged; cred_expire=5: a requeued job may start 5 s after it ended, not 121 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
# No cgroups, no affinity, no accounting daemon: what a container can do.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
# Two pretend GPUs per node (gres.conf): Slurm allocates them and sets SLURM_GPUS_ON_NODE
# as on a GPU cluster, which is what the launcher reads.
GresTypes=gpu
SelectTypeParameters=CR_Core
# The nodes report the CPUs written here, whatever this machine has.
SlurmdParameters=config_overrides
# Schedule within a second, not after the default minute.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
# debug2 logs each time-limit check (next_time_limit_check reads them).
SlurmctldDebug=debug2
SlurmdDebug=info
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started; safe to call twice and after
        a failed start."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.time() + 20
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        # Job steps outlive a stopped slurmd (slurmstepd daemonizes): end what is left.
        self._end_job_processes()
        # Nodes first, then the controller, then munged (the others authenticate through it).
        order = [n for n in self._procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in [n for n in order if n in self._procs]:
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()

    def _end_job_processes(self) -> None:
        """Processes of this cluster's jobs still alive: they carry our SLURM_CONF (srun,
        slurmstepd, launchers, ranks all inherit it). Ended by pid, never by name."""
        daemons = {os.getpid(), *(q.pid for q in self._procs.values())}
        mine = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid not in daemons and p.environ().get("SLURM_CONF") == str(self.conf):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        for p in mine:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=10)

    # --- helpers ----------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdout", "ab") as log:
            self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                 start_new_session=True)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}: {self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}: {self.logs()}")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def logs(self, lines: int = 15) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").strip().splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def run(self, cmd: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def next_time_limit_check(self, timeout: float = 40) -> float:
        """When slurmctld will next check time limits, which is when it sends a job's
        ``--signal`` warning: every 30 s (its PERIODIC_TIMEOUT), each check logged at debug2."""
        log = self.root / "log" / "slurmctld.log"
        deadline = time.time() + timeout
        while True:
            stamps = re.findall(r"^\[([\d-]+T[\d:.]+)\] debug2: Testing job time limits", log.read_text(), re.M)
            if stamps:
                return datetime.strptime(stamps[-1], "%Y-%m-%dT%H:%M:%S.%f").timestamp() + 30
            if time.time() > deadline:
                raise TimeoutError(f"no time-limit check in {log} after {timeout:.0f} s")
            time.sleep(0.5)

    # --- jobs -------------------------------------------------------------------------
    def sbatch(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.strip()
        return dict(m.groups() for m in re.finditer(r"(\w+)=(.*?)(?= \w+=|$)", out))

    def wait_for_end(self, job_id: str, *, restarts: int = 0, timeout: float = 300) -> dict[str, str]:
        """The job's final state, once it has been requeued ``restarts`` times (or has stayed
        ended for 10 s without: the caller's assertions then say what went wrong). A
        requeued job goes from RUNNING back to PENDING, never through an ended state."""
        deadline, ended_at = time.time() + timeout, None
        while True:
            info = self.job(job_id)
            if info["JobState"] in ENDED:
                ended_at = ended_at or time.time()
                if int(info["Restarts"]) >= restarts or time.time() - ended_at > 10:
                    return info
            else:
                ended_at = None
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} has not ended after {timeout:.0f} s: {info}\n{self.logs()}")
            time.sleep(0.25)
