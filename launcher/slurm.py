"""``polytask launch --slurm``: the torchrun layout of one node of a Slurm job, from the
``SLURM_*`` variables srun sets, so ``slurm/train.sbatch`` needs no arithmetic in bash.

``slurm/train.sbatch`` starts one ``polytask launch --slurm`` per node with srun. Each one
works out:

- nodes: ``SLURM_JOB_NUM_NODES``; this node: ``SLURMD_NODENAME`` / ``SLURM_NODEID``;
- the rendezvous endpoint: the first node of ``SLURM_JOB_NODELIST`` (``scontrol show
  hostnames``), at the address Slurm itself uses to reach it (``NodeAddr``: the node name
  on most clusters, an IP where names do not resolve), port ``20000 + job id % 10000``
  (below Linux's ephemeral range; the same on every node without talking to each other);
- processes per node: ``--nproc-per-node`` if given, else the GPUs Slurm allocated on
  this node (``SLURM_GPUS_ON_NODE``), else 1;
- the run directory: ``run.dir`` from the config or the overrides, else
  ``<submit dir>/runs/<job name>-<job id>`` (the job id survives a requeue, so a requeued
  job finds its own checkpoints); a requeued job resumes from them (``job_overrides``).

The batch shell asks the same question first (``--print-run-dir``), which also validates
the config before any node starts.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from launcher.torchrun import LaunchSpec
from trainer.config_loading import ConfigError, apply_overrides, read_yaml

PORT_BASE = 20000
PORT_SPAN = 10000


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    job_id: int
    job_name: str
    nodelist: str
    num_nodes: int
    node_id: int | None  # this task's node index; set by srun, not in the batch shell
    node_name: str | None
    restart_count: int
    gpus_on_node: int | None
    submit_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SlurmJob:
        def opt_int(key: str) -> int | None:
            value = env.get(key, "").strip()
            return int(value) if value.isdigit() else None

        job_id = opt_int("SLURM_JOB_ID")
        if job_id is None:
            raise ConfigError("--slurm: not inside a Slurm job (no SLURM_JOB_ID); "
                              "submit with `sbatch slurm/train.sbatch CONFIG [key=value ...]`")
        return cls(
            job_id=job_id,
            job_name=env.get("SLURM_JOB_NAME", "polytask"),
            nodelist=env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")),
            num_nodes=opt_int("SLURM_JOB_NUM_NODES") or opt_int("SLURM_NNODES") or 1,
            node_id=opt_int("SLURM_NODEID"),
            node_name=env.get("SLURMD_NODENAME"),
            restart_count=opt_int("SLURM_RESTART_COUNT") or 0,
            gpus_on_node=opt_int("SLURM_GPUS_ON_NODE"),
            submit_dir=Path(env.get("SLURM_SUBMIT_DIR", os.getcwd())),
        )


def rdzv_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def run_dir(config: str | Path, overrides: list[str], job: SlurmJob) -> Path:
    """Absolute run directory: ``run.dir`` when the config or an override sets it
    (relative to the working directory, the submit directory under sbatch), else one
    named after the job."""
    raw = apply_overrides(read_yaml(config), list(overrides))
    run = raw.get("run")
    if isinstance(run, dict) and run.get("dir") is not None:
        if not str(run["dir"]).strip():  # not the job's default: the user asked for something
            raise ConfigError("run.dir: empty value; give the run directory, or leave the key out")
        return Path(str(run["dir"])).absolute()
    return (job.submit_dir / "runs" / f"{job.job_name}-{job.job_id}").absolute()


def job_overrides(config: str | Path, overrides: list[str], job: SlurmJob) -> list[str]:
    """What a Slurm job adds to the user's overrides: the absolute run directory, and for a
    requeued instance (``SLURM_RESTART_COUNT`` > 0) whose run has a checkpoint,
    ``checkpoint.resume=auto``: it continues its own run, even where the first instance
    started from a given checkpoint (``checkpoint.resume=PATH``) or from scratch (``never``)."""
    directory = run_dir(config, overrides, job)
    extra = [f"run.dir={directory}"]
    if job.restart_count > 0 and (directory / "checkpoints" / "latest").exists():
        extra.append("checkpoint.resume=auto")
    return extra


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def first_node_address(nodelist: str) -> str:
    """Where the other nodes reach the first node: Slurm's ``NodeAddr`` for it."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise OSError(f"no node in {nodelist!r}")
    first = hosts[0]
    for field in _scontrol("show", "node", "-o", first).split():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value:
            return value
    return first


def ranks_per_node(job: SlurmJob, nproc_per_node: int | None) -> int:
    """``--nproc-per-node`` if given, else the GPUs Slurm allocated on the node, else 1."""
    return nproc_per_node if nproc_per_node is not None else (job.gpus_on_node or 1)


def launch_spec(job: SlurmJob, *, nproc_per_node: int | None, rdzv_endpoint: str | None,
                max_restarts: int = 0) -> LaunchSpec:
    """This node's torchrun layout. Explicit ``nproc_per_node`` / ``rdzv_endpoint`` win."""
    nproc = ranks_per_node(job, nproc_per_node)
    if rdzv_endpoint is None:
        try:
            rdzv_endpoint = f"{first_node_address(job.nodelist)}:{rdzv_port(job.job_id)}"
        except (OSError, subprocess.SubprocessError) as e:
            raise ValueError(f"--slurm: cannot find the first node of {job.nodelist!r} with scontrol ({e}); "
                             "pass --rdzv-endpoint HOST:PORT") from None
    # c10d rendezvous even on one node: the same code path for 1 and N nodes, and the
    # port comes from the job id instead of a fixed default that two jobs could share.
    return LaunchSpec(nproc_per_node=nproc, nnodes=job.num_nodes, rdzv_endpoint=rdzv_endpoint,
                      rdzv_id=f"slurm-{job.job_id}", max_restarts=max_restarts)


def describe(job: SlurmJob, spec: LaunchSpec) -> str:
    """One line per node for the job's log: which node, how many ranks, where they meet."""
    return (f"polytask launch: Slurm job {job.job_id} (SLURM_RESTART_COUNT={job.restart_count}) "
            f"node {job.node_name} (SLURM_NODEID {job.node_id} of {job.num_nodes}): "
            f"{spec.nproc_per_node} process(es), rendezvous {spec.rdzv_endpoint}")
