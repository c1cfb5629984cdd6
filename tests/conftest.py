"""Shared fixtures: real torchrun process groups and real converted demo shards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run_torchrun(args: list[str], *, nproc: int = 2, timeout: float = 600, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N <args>``; output captured for assertions."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_polytask(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m launcher <args>`` in one process (no torchrun), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sources_list(paths) -> str:
    """A YAML flow list of sources, ``[{path: a}, {path: b}]``, for a ``data.sources=`` or
    ``eval.sources=`` override."""
    return "[" + ", ".join(f"{{path: {p}}}" for p in paths) + "]"


def demo_source_overrides(shards: Path, *, split: str = "train", section: str = "data") -> list[str]:
    """``<section>.sources.<i>.path=...`` for every demo source, in configs/demo_cpu.yaml's order."""
    from data_pipelines.demo.shards import demo_source_paths

    return [f"{section}.sources.{i}.path={p}" for i, p in enumerate(demo_source_paths(shards, split=split))]


@pytest.fixture(scope="session")
def demo_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small demo data, generated and converted once per test session; returns the root
    holding ``<split>/<source>/manifest.json``."""
    from data_pipelines.demo.shards import make_demo_shards

    return make_demo_shards(tmp_path_factory.mktemp("demo"), seed=0, num_images={"train": 24, "val": 8})
