"""Which evaluated step is the best so far by ``eval.best_metric``; kept in
``<run.dir>/eval/best.json`` so that it survives a resume."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from data_pipelines.manifest import load_manifest
from trainer.evaluation.config import EvalConfig

BEST_NAME = "best.json"


def check_best_metric_source(cfg: EvalConfig) -> None:
    """``eval.best_metric`` names a configured validation source (``val/<source>/...``)."""
    names = [load_manifest(s.path).name for s in cfg.sources]
    source = (cfg.best_metric or "").split("/")[1:2]
    if not source or source[0] not in names:
        raise ValueError(f"eval.best_metric {cfg.best_metric!r}: expected val/<source>/<metric> "
                         f"with <source> one of the eval sources {names}")


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
