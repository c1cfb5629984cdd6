"""The training loop: one readable class, its steps called explicitly in order.

shards -> loader (stream, sampler, collate) -> model -> per-task losses -> global
normalisation -> weighted sum -> backward (DDP reduce) -> clip -> optimizer step.
The checkpointer and the metrics logger observe; they never steer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_pipelines.loader import build_train_loader
from data_pipelines.schema import Batch
from models import build_model
from trainer.checkpoint import Checkpointer
from trainer.config import JobConfig
from trainer.config_loading import dump_yaml, to_dict
from trainer.distributed import DistInfo
from trainer.metrics_logger import MetricsLogger
from trainer.optim import build_optimizer, build_scheduler
from trainer.task_losses import reduce_task_losses

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _LogWindow:
    """Sums over the steps since the last log line; per-task losses are averaged over the
    labelled samples of the whole window (a single step may hold none of a task)."""

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        self.loss_sum = torch.zeros(num_tasks, device=device)
        self.count = torch.zeros(num_tasks, device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.steps = 0
        self.images = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], *, images: int) -> None:
        # stays on the device: no host sync per step
        self.loss_sum += out["global_mean"] * out["global_count"]
        self.count += out["global_count"]
        self.grad_norm_sum += out["grad_norm"].detach()
        self.steps += 1
        self.images += images


class Trainer:
    def __init__(self, cfg: JobConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        # Same seed on every rank: identical initial weights (DDP also broadcasts them).
        seed_everything(cfg.run.seed)

        self.loader, self.label_space, self.manifests = build_train_loader(
            cfg.data, rank=dist_info.rank, world_size=dist_info.world_size
        )
        model = build_model(cfg.model, num_classes=self.label_space.num_classes()).to(self.device)
        self.tasks: list[str] = list(cfg.model.tasks)
        self.loss_weights = {t: cfg.trainer.loss_weights.get(t, 1.0) for t in self.tasks}
        self.model = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps=cfg.trainer.max_steps)
        self.step = 0

        self.checkpointer = Checkpointer(run_dir=self.run_dir, cfg=cfg.checkpoint, is_main=dist_info.is_main)
        wandb_run_id = self._maybe_resume()
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.metrics = MetricsLogger(
            run_dir=self.run_dir, cfg=cfg.wandb, config=to_dict(cfg),
            enabled=dist_info.is_main, run_id=wandb_run_id,
        )

    # --- checkpoint state -------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "train": {"step": self.step},
        }

    def _maybe_resume(self) -> str | None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        path = self.checkpointer.latest() if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = self._state()
        meta = self.checkpointer.load(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["train"]["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return meta.get("wandb_run_id")

    def save_checkpoint(self) -> Path:
        meta = {"wandb_run_id": self.metrics.run_id, "world_size": self.dist.world_size}
        return self.checkpointer.save(self.step, self._state(), meta)

    # --- one step ---------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.trainer.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device)
        with self._autocast():
            losses, counts = self.model(batch)
        reduced = reduce_task_losses(losses, counts, world_size=self.dist.world_size)
        total = sum(self.loss_weights[t] * reduced.scaled[t] for t in self.tasks)

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip = self.cfg.optim.grad_clip
        params = self.model.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"global_mean": reduced.global_mean, "global_count": reduced.global_count, "grad_norm": grad_norm}

    # --- the loop ---------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg.trainer
        if self.step >= cfg.max_steps:
            log.info("nothing to do: step %d >= trainer.max_steps %d", self.step, cfg.max_steps)
            return
        self.model.train()
        data_iter = iter(self.loader)
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.dist.is_main,
                        desc="train", dynamic_ncols=True)
        window = _LogWindow(len(self.tasks), self.device)
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = next(data_iter)
            window.data_wait += time.perf_counter() - t0
            out = self.train_step(batch)
            window.add(out, images=len(batch))
            progress.update(1)
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                row = self._metrics_row(window)
                self.metrics.log(self.step, row)
                progress.set_postfix({k[5:]: f"{v:.3f}" for k, v in row.items() if k.startswith("loss/")})
                window = _LogWindow(len(self.tasks), self.device)
            if self.checkpointer.should_save(self.step, last=last):
                self.save_checkpoint()
        progress.close()

    def _metrics_row(self, window: "_LogWindow") -> dict[str, float]:
        counts = window.count.tolist()
        means = (window.loss_sum / window.count.clamp(min=1)).tolist()
        row: dict[str, float] = {}
        for i, t in enumerate(self.tasks):
            if counts[i] > 0:  # no labelled sample of this task in the window: no loss to show
                row[f"loss/{t}"] = means[i]
            row[f"weight/{t}"] = self.loss_weights[t]
            row[f"samples/{t}"] = counts[i]
        row["loss/total"] = float(sum(self.loss_weights[t] * means[i] for i, t in enumerate(self.tasks)))
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["grad_norm"] = float(window.grad_norm_sum) / max(window.steps, 1)
        elapsed = time.perf_counter() - window.started
        # every rank draws the same batch size, so images/s over all ranks is local x world
        row["throughput/images_per_s"] = window.images * self.dist.world_size / max(elapsed, 1e-9)
        row["time/data_wait_frac"] = window.data_wait / max(elapsed, 1e-9)
        return row

    # --- end of run -------------------------------------------------------------------
    def replica_digests(self) -> list[str]:
        """sha256 of every rank's parameters; DDP replicas must be bit-identical."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        digests: list[str] = [""] * self.dist.world_size
        dist.all_gather_object(digests, h.hexdigest())
        return digests

    def finish(self) -> dict[str, Any]:
        digests = self.replica_digests()
        summary = {"step": self.step, "world_size": self.dist.world_size, "replica_digests": digests,
                   "replicas_in_sync": len(set(digests)) == 1, "wandb_run_id": self.metrics.run_id}
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not summary["replicas_in_sync"]:
            log.error("DDP replicas diverged: %s", digests)
        self.metrics.close()
        return summary
