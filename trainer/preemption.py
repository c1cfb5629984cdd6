"""Checkpoint-and-stop on request: how a Slurm job survives its time limit or a preemption.

The handshake with ``slurm/train.sbatch`` (whose batch shell runs on the job's first node):

1. Slurm signals the batch shell (``#SBATCH --signal=B:USR1@N`` before the time limit, or
   ``scancel --signal=USR1 --batch JOB``). Its trap writes ``<run.dir>/preempt.request``.
2. At every step boundary each rank calls :meth:`PreemptionFlag.requested`: one process
   per node (local rank 0) looks for the file, and a MAX all-reduce over all ranks makes
   every rank take the same decision at the same step. Ranks that decided differently
   would enter different collectives and hang; one tiny all-reduce per step (on gloo, so
   a GPU job does not synchronise its stream for it) is the price.
3. When set, every rank saves a checkpoint at this step (unless the loop just saved one),
   then local rank 0 of every node writes ``<run.dir>/preempt.done`` (the step) and
   removes the request; the ranks exit 0 with the run unfinished (no ``summary.json``).
4. The batch shell sees ``preempt.done``, waits for the ranks to exit, then ``scontrol
   requeue``\\s the job, which resumes from ``checkpoints/latest``.

Why a reader and a writer on every node rather than rank 0 alone: the batch shell runs on
the first node, where a file it writes is visible at once; a shared filesystem's client on
another node (NFS) may go on reporting "no such file" for up to a minute. With one reader
per node, the first node's reader sees the request immediately, and the first node's
writer makes ``preempt.done`` visible to the batch shell immediately, wherever rank 0 is.

The request can also be made by hand (``touch RUN_DIR/preempt.request``): the run
checkpoints at its next step and stops; start it again to continue.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEST_NAME = "preempt.request"
DONE_NAME = "preempt.done"


class PreemptionFlag:
    """Collective "checkpoint now and stop" flag, polled once per step.

    Construct it on every rank at the same point (it may create a process group)."""

    def __init__(self, run_dir: str | Path, *, local_rank: int) -> None:
        self.request = Path(run_dir) / REQUEST_NAME
        self.done = Path(run_dir) / DONE_NAME
        self._is_node_reader = local_rank == 0
        self._distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._group = None
        if self._distributed and dist.get_backend() != "gloo":
            # A CPU tensor on a CPU group: NCCL would need a device tensor and a host sync.
            self._group = dist.new_group(backend="gloo")

    def requested(self) -> bool:
        """Collective: the same answer on every rank."""
        flag = torch.tensor([1 if self._is_node_reader and self.request.exists() else 0], dtype=torch.int32)
        if self._distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def acknowledge(self, step: int) -> None:
        """After the checkpoint of ``step`` is complete: tell the batch shell (one writer per
        node, see the module doc) and consume the request."""
        if not self._is_node_reader:
            return
        # Write-then-rename: the shell never reads a half-written file. The temporary name
        # is unique per writer, since every node writes the same final file.
        tmp = self.done.with_name(f"{DONE_NAME}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, self.done)
        self.request.unlink(missing_ok=True)


def slurm_job_info(env: Mapping[str, str] = os.environ) -> dict[str, str | int]:
    """The Slurm job this process runs in (empty outside Slurm): logged at start and kept
    with the W&B config and in metrics rows, so a requeued run shows where it restarted."""
    if "SLURM_JOB_ID" not in env:
        return {}
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return {
        "job_id": env["SLURM_JOB_ID"],
        "restart_count": int(restarts) if restarts.isdigit() else 0,
        "nodelist": env.get("SLURM_JOB_NODELIST", ""),
        "num_nodes": int(env.get("SLURM_JOB_NUM_NODES", "1") or 1),
    }
