"""The job config: one typed config per component, composed at the root.

Components receive their own section (``cfg.model``, ``cfg.data`` ...), never the whole job.
The trainer's own sections are defined here; data, model and evaluation define theirs next
to their code. Every config module is torch-free: ``polytask launch`` reads and validates a
config, and reports its errors, in well under a second, before anything imports torch
(tests/launcher/test_cli_imports.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from data_pipelines.streaming.config import DataConfig
from models.config import ModelConfig
from models.trunk_cut import CUTS
from trainer.config_loading import ConfigError, apply_overrides, from_dict, read_yaml
from trainer.evaluation.config import EvalConfig
from trainer.metrics_logger import WandbConfig


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/demo"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.dir.strip():
            # "" would silently mean the current directory.
            raise ValueError("run.dir is empty; give the run directory")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 2
    # Extra DeepSpeed config keys, merged (recursively) over the generated config.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int = 300
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; statistics stay fp32
    # Static per-task loss weights by task name (model.tasks; dynamic balancing comes with
    # the balancer); missing = 1.0.
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


def check_loss_weights(weights: dict[str, float], tasks: list[str]) -> None:
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"trainer.loss_weights: unknown task(s) {unknown}; the tasks (model.tasks) are {tasks}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            if not math.isfinite(getattr(self, name)):  # nan passes every comparison below
                raise ValueError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_steps and optim.grad_clip must be >= 0, optim.min_lr_ratio in [0, 1]")


CHECKPOINT_FORMATS = ("raw", "dcp")  # DCP storage of DDP checkpoints, see CheckpointConfig.format


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    # "auto": continue from checkpoints/latest when present; "never"; or a checkpoint path.
    resume: str = "auto"
    # DDP only: write in a background thread while training goes on; the checkpoint becomes
    # `latest` at the first step boundary after every rank finished writing.
    async_save: bool = False
    # DDP only. "raw": our storage, tensors as raw bytes (raw_storage.py, the faster save);
    # "dcp": DCP's stock FileSystemWriter, which stock tools (format_utils.dcp_to_torch_save)
    # read. polytask loads both.
    format: str = "raw"

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
        if self.format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint.format must be one of {list(CHECKPOINT_FORMATS)}, got {self.format!r}")


# Every loss balancer (trainer/balancers), by what its coefficients depend on: "fixed" never
# change (static, equal); "loss" follows the losses only; "gradient" needs per-task gradient
# statistics every step. Listed here, torch-free, so that balancer.name is checked when the
# config loads; registering a balancer (trainer/balancers/registry.py) checks its class
# against its entry.
BALANCER_KINDS: dict[str, Literal["fixed", "loss", "gradient"]] = {
    "static": "fixed", "equal": "fixed",
    "uncertainty": "loss", "dwa": "loss", "famo": "loss",
    "gradnorm": "gradient", "mgda": "gradient", "pcgrad": "gradient", "cagrad": "gradient",
    "imtl_g": "gradient", "aligned_mtl": "gradient", "nash_mtl": "gradient",
}


@dataclass(kw_only=True)
class BalancerConfig:
    name: str = "static"  # static (weights: trainer.loss_weights), equal, uncertainty, dwa, gradnorm, ...
    # Where gradient methods take per-task gradients (models.trunk_cut): features = w.r.t. the
    # shared features z; fpn, layer4, layer3 = the trunk parameters from there up to z;
    # parameters = every trunk parameter (the reference: a backward through the trunk per unit).
    # Default (null): fpn for gradient methods, the cheapest cut that sees conflicts between
    # sources (bench/balancing_speed.py: ~1.02x the step of features on the 2-rank demo).
    statistics: str | None = None
    # Gram of shared-parameter gradients over ranks: exact (one reduce-scatter of the T
    # per-task gradients) or sketch (a CountSketch of sketch_dim values per task; unbiased,
    # cosine standard error <= sqrt(2 / sketch_dim)). Statistics at z are always exact.
    gram: Literal["exact", "sketch"] = "exact"
    sketch_dim: int = 1024
    # Method hyper-parameters (paper defaults otherwise), e.g. {alpha: 1.5} for gradnorm.
    options: dict[str, Any] = field(default_factory=dict)
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "mode": "write balancer.statistics: features (was representation), fpn, layer4, layer3 or parameters"}

    def __post_init__(self) -> None:
        if self.name not in BALANCER_KINDS:
            raise ValueError(f"balancer.name: unknown {self.name!r}; expected one of {list(BALANCER_KINDS)}")
        if self.statistics is not None and self.statistics not in CUTS:
            raise ValueError(f"balancer.statistics: unknown {self.statistics!r}; expected one of {list(CUTS)}")
        if self.name == "static" and "weights" in self.options:
            raise ValueError("balancer.options.weights: static weights are set in one place, trainer.loss_weights")
        for key, value, default in (("statistics", self.statistics, None), ("gram", self.gram, "exact")):
            if not self.needs_gram and value != default:
                raise ValueError(f"balancer.{key}={value!r} would be ignored: balancer.name={self.name!r} "
                                 f"uses no gradient statistics")
        if self.gram == "sketch" and self.where == "features":
            raise ValueError("balancer.gram=sketch would be ignored: statistics at the features (z) are always exact; "
                             "sketching applies to balancer.statistics=fpn, layer4, layer3 or parameters")
        if self.gram != "sketch" and self.sketch_dim != 1024:
            raise ValueError("balancer.sketch_dim would be ignored: it is used with balancer.gram=sketch only")
        if self.sketch_dim < 1:
            raise ValueError(f"balancer.sketch_dim: expected a positive number of buckets, got {self.sketch_dim}")

    @property
    def fixed(self) -> bool:
        """The coefficients never depend on the step (static, equal)."""
        return BALANCER_KINDS[self.name] == "fixed"

    @property
    def needs_gram(self) -> bool:
        """A gradient method: per-task gradient passes every step."""
        return BALANCER_KINDS[self.name] == "gradient"

    @property
    def where(self) -> str:
        """``statistics`` resolved: fpn for gradient methods when not set."""
        return self.statistics or ("fpn" if self.needs_gram else "features")


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
    eval: EvalConfig = field(default_factory=EvalConfig)  # no sources: no evaluation

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
        if self.model.task_specs is not None:  # else checked against the derived tasks (preflight)
            check_loss_weights(self.trainer.loss_weights, [t.name for t in self.model.task_specs])
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read ``path``, apply ``key=value`` overrides, validate. Raises :class:`ConfigError`."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return from_dict(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
