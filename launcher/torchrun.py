"""Build the torchrun command line for a polytask job (single node, multi-node, Slurm)."""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(kw_only=True)
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None  # HOST:PORT of the first node; None = standalone
    rdzv_id: str = "polytask"
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError("--nproc-per-node and --nnodes must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")


def torchrun_command(spec: LaunchSpec, config_path: str, overrides: list[str]) -> list[str]:
    """An argument list (never a shell string): overrides reach the ranks byte for byte."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.rdzv_endpoint:
        cmd += [
            f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={spec.rdzv_id}",
        ]
        if spec.node_rank is not None:
            cmd.append(f"--node-rank={spec.node_rank}")
    else:
        cmd.append("--standalone")
    cmd.append(f"--max-restarts={spec.max_restarts}")
    cmd += ["-m", "launcher", "train", config_path, *overrides]
    return cmd
