"""Distributed backends behind one training loop: ``trainer.backend: ddp | deepspeed``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.backends.base import TrainBackend
from trainer.config import OptimConfig
from trainer.weights_digest import weights_digest

log = logging.getLogger(__name__)
BACKENDS = ("ddp", "deepspeed")

if TYPE_CHECKING:  # trainer.config composes every component's config, backends included
    from trainer.config import TrainerConfig


def build_backend(cfg: "TrainerConfig", model: nn.Module, *, optim: OptimConfig, device: torch.device,
                  micro_batch_size: int, async_save: bool = False, checkpoint_format: str = "raw") -> TrainBackend:
    if cfg.backend == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend(model, optim=optim, max_steps=cfg.max_steps, device=device, async_save=async_save,
                          checkpoint_format=checkpoint_format)
    if cfg.backend == "deepspeed":
        from trainer.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(
            model, cfg=cfg.deepspeed, optim=optim, max_steps=cfg.max_steps, micro_batch_size=micro_batch_size,
            grad_accum_steps=cfg.grad_accum_steps, bf16=cfg.precision == "bf16",
        )
    raise ValueError(f"trainer.backend: unknown backend {cfg.backend!r}")


def backend_class(name: str) -> type[TrainBackend]:
    """The backend class of ``name`` (imported on demand: DeepSpeed is heavy)."""
    if name == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend
    if name == "deepspeed":
        from trainer.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend
    raise ValueError(f"unknown backend {name!r}; known: {list(BACKENDS)}")


def load_model_weights(model: nn.Module, path: str | Path, *, backend: str) -> None:
    """Only the model's weights from a checkpoint that ``backend`` wrote; each backend reads
    its own format (collective for DDP checkpoints)."""
    backend_class(backend).load_model_weights(model, Path(path))
    log.info("loaded model weights from %s (%s backend), sha256 %s", path, backend, weights_digest(model.state_dict()))


__all__ = ["BACKENDS", "TrainBackend", "backend_class", "build_backend", "load_model_weights"]
