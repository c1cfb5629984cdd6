"""Metrics to ``metrics.jsonl`` and W&B, from rank 0 only. It observes; it never steers.

A W&B failure (no disk, bad key, no network in online mode) warns once and training
goes on with ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class WandbConfig:
    # offline unless the user asks for online; "disabled" skips W&B (metrics.jsonl stays).
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "polytask"
    entity: str | None = None
    name: str | None = None
    every: int = 1  # log to W&B every N logged steps


class MetricsLogger:
    """Args:
        run_dir: the run directory (``metrics.jsonl`` and ``wandb/`` go there).
        cfg: the W&B section of the config.
        config: the resolved config as plain data, recorded with the W&B run.
        enabled: False on every rank but 0.
        run_id: W&B run id to continue (from a checkpoint), or None for a new run.
    """

    def __init__(self, *, run_dir: str | Path, cfg: WandbConfig, config: dict[str, Any],
                 enabled: bool, run_id: str | None = None) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._wandb_run = None
        self._num_logged = 0
        self.run_id = run_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.mode != "disabled":
            self._start_wandb(config)

    def _start_wandb(self, config: dict[str, Any]) -> None:
        try:
            import wandb

            # The API key, if any, comes from the environment or ~/.netrc; it never enters
            # our config, logs or checkpoints.
            self._wandb_run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name,
                dir=str(self.run_dir), mode=self.cfg.mode, id=self.run_id, resume="allow",
                config=config,
                settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"),
            )
            self.run_id = self._wandb_run.id
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            log.warning("W&B disabled for this run (%s: %s); metrics still go to metrics.jsonl",
                        type(e).__name__, e)
            self._wandb_run = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._num_logged += 1
        if self._wandb_run is not None and self._num_logged % self.cfg.every == 0:
            try:
                self._wandb_run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B log failed (%s); W&B disabled, metrics.jsonl continues", e)
                self._wandb_run = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)
            self._wandb_run = None

