"""Which evaluated step is the best so far by ``eval.best_metric``; kept in
``<run.dir>/eval/best.json`` so that it survives a resume."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from collections.abc import Mapping

from trainer.evaluation.coco_metrics import STAT_NAMES
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.dense_metrics import TOP_K
from trainer.evaluation.source_spec import SourceSpec

BEST_NAME = "best.json"
SEMANTIC_STATS = ("mIoU", "pixel_acc")  # dense_metrics.semantic_scores


def check_best_metric(cfg: EvalConfig, specs: Mapping[str, SourceSpec]) -> None:
    """``eval.best_metric`` is a key the evaluation of ``specs`` (``eval_source_specs``) will
    report: ``val/<source>/<bbox|segm|keypoints|semantic|classification>/<metric>``. Checked
    before training, not when the first evaluation is over."""
    if cfg.best_metric is None:
        return
    if not cfg.sources:
        raise ValueError(f"eval.best_metric is {cfg.best_metric!r} but eval.sources is empty, so nothing is "
                         f"evaluated; add eval.sources or set eval.best_metric=null")
    parts = cfg.best_metric.split("/")
    source = parts[1] if len(parts) > 1 else ""
    if source not in specs:
        raise ValueError(f"eval.best_metric {cfg.best_metric!r}: expected val/<source>/<task>/<metric> with "
                         f"<source> one of the eval sources {sorted(specs)}")
    known = metric_keys(specs[source])
    if cfg.best_metric not in known:
        raise ValueError(f"eval.best_metric {cfg.best_metric!r} is not a metric of source {source!r}; "
                         f"expected one of {known}")


def metric_keys(spec: SourceSpec) -> list[str]:
    """The ``val/...`` keys the evaluator reports for one source."""
    scored = {iou: STAT_NAMES[iou] for iou in spec.iou_types}
    if spec.semantic_classes is not None:
        scored["semantic"] = SEMANTIC_STATS
    for task in spec.image_classes:  # classification: keyed by the task's name
        scored[task] = tuple(f"top{k}" for k in TOP_K)
    return [f"val/{spec.name}/{task}/{stat}" for task, stats in scored.items() for stat in stats]


class BestMetricTracker:
    """Every rank may call :meth:`update` with the same metrics and gets the same answer;
    only ``is_main`` writes the file."""

    def __init__(self, cfg: EvalConfig, *, run_dir: str | Path, is_main: bool) -> None:
        if cfg.best_metric is None:
            raise ValueError("eval.best_metric is not set; there is no best checkpoint to track")
        self.metric = cfg.best_metric
        self.mode = cfg.best_mode
        self.path = Path(run_dir) / "eval" / BEST_NAME
        self.is_main = is_main
        self.best = self._read()

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record ``step`` if its metric beats the best so far; True when it does."""
        if self.metric not in metrics:
            known = sorted(k for k in metrics if k.startswith("val/"))
            raise KeyError(f"eval.best_metric {self.metric!r} is not among the evaluated metrics {known}")
        value = metrics[self.metric]
        if math.isnan(value) or not self._beats(value):
            return False
        self.best = {"metric": self.metric, "mode": self.mode, "step": step, "value": value}
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.best, indent=2))
            os.replace(tmp, self.path)
        return True

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else int(self.best["step"])

    def _beats(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        best = json.loads(self.path.read_text())
        # A different metric or direction than this run's config: start over.
        return best if (best.get("metric"), best.get("mode")) == (self.metric, self.mode) else None
