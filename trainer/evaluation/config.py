"""The ``eval`` section of the job config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipelines.streaming.config import SourceConfig


@dataclass(kw_only=True)
class EvalConfig:
    # Converted validation source directories (manifest.json + shards); none = no evaluation.
    sources: list[SourceConfig] = field(default_factory=list)
    every: int = 0  # steps between evaluations during training; 0 = only at the end
    batch_size: int = 4  # per rank
    num_workers: int = 1  # data-loader workers per rank
    # A metric key such as "val/shapes_instances/bbox/AP"; None = no best-checkpoint tracking.
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    max_images: int | None = None  # per source, N spread evenly over it; None = all

    def __post_init__(self) -> None:
        for i, source in enumerate(self.sources):
            if source.weight is not None:
                raise ValueError(f"eval.sources[{i}].weight: validation sources are read whole, not sampled")
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.every > 0 and not self.sources:
            raise ValueError(f"eval.every is {self.every} but eval.sources is empty")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"eval.num_workers must be >= 0, got {self.num_workers}")
        if self.best_metric is not None and not self.best_metric.startswith("val/"):
            raise ValueError(
                f"eval.best_metric must be a metric key like 'val/<source>/bbox/AP', got {self.best_metric!r}"
            )
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"eval.best_mode must be 'max' or 'min', got {self.best_mode!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"eval.max_images must be >= 1 or null, got {self.max_images}")

    @property
    def enabled(self) -> bool:
        return bool(self.sources)

    def due(self, step: int, *, last: bool) -> bool:
        """Whether the training loop evaluates after ``step``."""
        return self.enabled and (last or (self.every > 0 and step % self.every == 0))
