"""data.num_workers: auto -> this node's cores shared by its local ranks, one per main process."""
import logging
import os

import pytest

from data_pipelines.demo.shards import demo_source_paths
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.workers import auto_num_workers, resolve_num_workers


@pytest.mark.parametrize("cores, local_ranks, readers, expected", [
    (16, 1, 16, 8),    # 15 spare -> largest divisor of 16 within it
    (128, 8, 16, 8),   # 16 per rank, 15 spare
    (96, 8, 16, 8),    # 11 spare
    (12, 1, 4, 4),     # capped by readers_per_rank
    (7, 1, 6, 6),
    (4, 1, 6, 3),      # 3 spare, 3 divides 6
    (2, 2, 4, 0),      # one core per rank: the main process loads
    (1, 4, 4, 0),      # more ranks than cores: still >= 0
])
def test_auto_num_workers(cores, local_ranks, readers, expected):
    assert auto_num_workers(cores=cores, local_ranks=local_ranks, readers_per_rank=readers) == expected


def test_resolve_reads_affinity_and_local_world_size_and_logs_the_rank(monkeypatch, caplog):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with caplog.at_level(logging.INFO, logger="data_pipelines.streaming.workers"):
        got = resolve_num_workers("auto", readers_per_rank=4, rank=3)
    assert got == auto_num_workers(cores=cores, local_ranks=1, readers_per_rank=4)
    assert "rank 3" in caplog.text and "data.num_workers=auto" in caplog.text and f"{cores} cores" in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # a rank per core: nothing spare
    assert resolve_num_workers("auto", readers_per_rank=4, rank=0) == 0
    assert resolve_num_workers(2, readers_per_rank=4, rank=0) == 2  # a number stays as it is


def test_config_accepts_auto_and_names_a_typo():
    sources = [SourceConfig(path="x")]
    assert DataConfig(sources=sources, num_workers="auto").num_workers == "auto"
    with pytest.raises(ValueError, match="DataConfig.num_workers must be an integer >= 0 or 'auto', got 'aotu'"):
        DataConfig(sources=sources, num_workers="aotu")


def test_config_override_auto_loads(tmp_path):
    from trainer.config import load_config

    cfg = load_config("configs/demo_cpu.yaml", ["data.num_workers=auto"])
    assert cfg.data.num_workers == "auto"
    assert load_config("configs/demo_cpu.yaml", ["data.num_workers=2"]).data.num_workers == 2


def test_loader_starts_the_resolved_worker_count(demo_sources, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = DataConfig(sources=[SourceConfig(path=p) for p in demo_source_paths(demo_sources)], num_workers="auto")
    loader, _, _ = build_train_loader(cfg, rank=0, world_size=1)
    expected = auto_num_workers(cores=len(os.sched_getaffinity(0)), local_ranks=1, readers_per_rank=4)
    assert loader.num_workers == expected
