"""The demo job that the benches measure: ``configs/demo_cpu.yaml`` pointed at demo shards
(:func:`data_pipelines.demo.shards.make_demo_shards`), in one quiet process."""
from __future__ import annotations

import os
from pathlib import Path

from data_pipelines.demo.shards import demo_source_paths
from trainer.distributed import DistInfo, init_distributed

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


def demo_overrides(shards: Path, run_dir: Path, *, evaluate: bool = False) -> list[str]:
    """Overrides of ``configs/demo_cpu.yaml`` for a bench: the demo's train split under
    ``shards``, the run in ``run_dir``, no W&B, no loader workers, no resume, no best
    checkpoint; evaluation on the val split when ``evaluate``, else none."""
    overrides = [f"data.sources.{i}.path={p}" for i, p in enumerate(demo_source_paths(shards, split="train"))]
    if evaluate:
        overrides += [f"eval.sources.{i}.path={p}" for i, p in enumerate(demo_source_paths(shards, split="val"))]
    else:
        overrides.append("eval.sources=[]")
    return overrides + [f"run.dir={run_dir}", "wandb.mode=disabled", "data.num_workers=0",
                        "checkpoint.resume=never", "eval.best_metric=null"]


def single_process_group(device: str = "cpu") -> DistInfo:
    """World size 1 (gloo on CPU), even when started from a shell that a launcher left
    torchrun's variables in; every trainer of this process shares it."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    return init_distributed(device=device)
