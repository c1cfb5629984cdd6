"""The job config: one typed config per component, composed at the root.

Components receive their own section (``cfg.model``, ``cfg.data`` ...), never the whole job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_pipelines.streaming.loader import DataConfig
from data_pipelines.schema import TASKS
from models.config import ModelConfig
from trainer.backends.deepspeed_backend import DeepSpeedConfig
from trainer.balancing import BalancerConfig
from trainer.checkpoint import CheckpointConfig
from trainer.config_loading import ConfigError, apply_overrides, from_dict, read_yaml
from trainer.evaluation.config import EvalConfig
from trainer.metrics_logger import WandbConfig
from trainer.optim import OptimConfig


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/demo"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.dir.strip():
            # "" would silently mean the current directory.
            raise ValueError("run.dir is empty; give the run directory")


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int = 300
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; statistics stay fp32
    # Static per-task loss weights (dynamic balancing comes with the balancer); missing = 1.0.
    loss_weights: dict[str, float] = field(default_factory=dict)
    log_every: int = 10
    dist_timeout_s: int = 600
    # Micro-batches per optimizer step (data.batch_size each); gradients sync on the last.
    grad_accum_steps: int = 1
    # Python's garbage collector runs every N steps on every rank together, not whenever a
    # rank's allocations trigger it (trainer/garbage_collection.py); 0 = Python's automatic GC.
    gc_every: int = 50
    # A step whose global gradient norm is not finite (NaN/inf loss or gradient) is skipped:
    # no optimizer update. The run stops with an error naming the tasks after more than this
    # many such steps in a row (0: at the first one).
    max_bad_steps: int = 5

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"trainer.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.gc_every < 0:
            raise ValueError(f"trainer.gc_every must be >= 0, got {self.gc_every}")
        if self.log_every < 1:
            raise ValueError(f"trainer.log_every must be >= 1, got {self.log_every}")
        if self.max_bad_steps < 0:
            raise ValueError(f"trainer.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        bad = {t: w for t, w in self.loss_weights.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"trainer.loss_weights must be finite and >= 0, got {bad}")
        unknown = sorted(set(self.loss_weights) - set(TASKS))
        if unknown:
            raise ValueError(f"trainer.loss_weights: unknown task(s) {unknown}; expected some of {list(TASKS)}")


@dataclass(kw_only=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)

    def __post_init__(self) -> None:
        if self.checkpoint.async_save and self.trainer.backend != "ddp":
            raise ValueError("checkpoint.async_save is implemented for trainer.backend=ddp only")
        if self.checkpoint.format != "raw" and self.trainer.backend != "ddp":
            # ZeRO checkpoints are DeepSpeed's own; the setting would be ignored.
            raise ValueError(f"checkpoint.format={self.checkpoint.format} is implemented for trainer.backend=ddp only "
                             f"(DeepSpeed writes its own checkpoint format)")
        if not self.balancer.fixed and self.trainer.grad_accum_steps > 1:
            # A dynamic balancer needs the step's global statistics before its backward pass.
            raise ValueError(f"balancer.name={self.balancer.name!r} needs trainer.grad_accum_steps=1 "
                             f"(only static and equal accumulate micro-batches)")
        if self.trainer.loss_weights and self.balancer.name != "static":
            raise ValueError(f"trainer.loss_weights would be ignored: it sets the weights of balancer.name=static, "
                             f"and balancer.name is {self.balancer.name!r}")
        if (self.balancer.needs_gram and self.trainer.backend == "deepspeed"
                and self.trainer.deepspeed.zero_stage == 3):
            # ZeRO-3 partitions every parameter and gathers it per module around DeepSpeed's own
            # backward; the extra per-task passes through heads and trunk run outside it (measured:
            # with ZeRO-3 the step's gradient differed from DDP's, norm 64 vs 124, from step 1).
            raise ValueError(f"balancer.name={self.balancer.name!r} takes per-task gradient passes, which ZeRO stage 3's "
                             f"partitioned parameters do not support: use trainer.deepspeed.zero_stage=1 or 2, or "
                             f"trainer.backend=ddp")
    eval: EvalConfig = field(default_factory=EvalConfig)  # no sources: no evaluation


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read ``path``, apply ``key=value`` overrides, validate. Raises :class:`ConfigError`."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return from_dict(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
