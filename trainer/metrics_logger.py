"""Metrics to ``metrics.jsonl`` and W&B, from rank 0 only. It observes; it never steers.

A W&B failure (no disk, bad key, no network in online mode) warns once and training
goes on with ``metrics.jsonl``. W&B starts in a background thread: ``wandb.init`` can take
seconds (minutes online without a network), and rank 0 must not keep the other ranks
waiting at the first collective meanwhile (they would time out with an error that never
mentions W&B). Rows logged before it is up are sent once it is.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import string
import threading
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
    # wandb.init gives up after this long (it runs beside training; W&B's default is 90 s).
    init_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"wandb.every must be >= 1, got {self.every}")
        if not (math.isfinite(self.init_timeout_s) and self.init_timeout_s > 0):
            raise ValueError(f"wandb.init_timeout_s must be a finite number > 0, got {self.init_timeout_s}")


def new_run_id() -> str:
    """A W&B-style run id (8 of [a-z0-9]), chosen before W&B starts so that checkpoints
    can record it at once and a resumed job continues the same W&B run."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


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
        self._wandb_init: threading.Thread | None = None
        self._unsent: list[tuple[int, dict[str, float]]] = []  # rows logged while W&B starts
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.mode != "disabled":
            self.run_id = run_id or new_run_id()
            self._wandb_init = threading.Thread(target=self._start_wandb, args=(config,), name="wandb-init",
                                                daemon=True)
            self._wandb_init.start()

    def wandb_started(self, timeout: float | None = 0.0) -> bool:
        """Whether W&B's start has finished (successfully or not), waiting up to ``timeout``
        seconds (None: until it has)."""
        if self._wandb_init is not None:
            self._wandb_init.join(timeout)
            if self._wandb_init.is_alive():
                return False
            self._wandb_init = None
        return True

    def _start_wandb(self, config: dict[str, Any]) -> None:
        try:
            import wandb

            # The API key, if any, comes from the environment or ~/.netrc; it never enters
            # our config, logs or checkpoints.
            self._wandb_run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name,
                dir=str(self.run_dir), mode=self.cfg.mode, id=self.run_id, resume="allow",
                config=config,
                settings=wandb.Settings(silent=True, x_disable_stats=True, console="off",
                                        init_timeout=self.cfg.init_timeout_s),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            log.warning("W&B disabled for this run (%s: %s); metrics still go to metrics.jsonl",
                        type(e).__name__, e)
            self._wandb_run = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._num_logged += 1
        if self._num_logged % self.cfg.every == 0:
            self._unsent.append((step, metrics))
            self._send()

    def _send(self) -> None:
        """Rows to W&B once it is up (only this thread logs; the init thread only starts it)."""
        if not self.wandb_started():
            return
        rows, self._unsent = self._unsent, []
        for step, metrics in rows:
            if self._wandb_run is None:
                return
            try:
                self._wandb_run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B log failed (%s); W&B disabled, metrics.jsonl continues", e)
                self._wandb_run = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if not self.wandb_started(timeout=self.cfg.init_timeout_s + 10):
            log.warning("W&B still starting after %.0f s at the end of the run; its rows are only in metrics.jsonl",
                        self.cfg.init_timeout_s + 10)
            return
        self._send()
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)
            self._wandb_run = None

