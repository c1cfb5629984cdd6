"""Distributed backends behind one training loop: ``trainer.backend: ddp | deepspeed``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.backends.base import TrainBackend
from trainer.optim import OptimConfig

if TYPE_CHECKING:  # trainer.config composes every component's config, backends included
    from trainer.config import TrainerConfig


def build_backend(cfg: "TrainerConfig", model: nn.Module, *, optim: OptimConfig, device: torch.device,
                  micro_batch_size: int, async_save: bool = False) -> TrainBackend:
    if cfg.backend == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend(model, optim=optim, max_steps=cfg.max_steps, device=device, async_save=async_save)
    if cfg.backend == "deepspeed":
        from trainer.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(
            model, cfg=cfg.deepspeed, optim=optim, max_steps=cfg.max_steps, micro_batch_size=micro_batch_size,
            grad_accum_steps=cfg.grad_accum_steps, bf16=cfg.precision == "bf16",
        )
    raise ValueError(f"trainer.backend: unknown backend {cfg.backend!r}")


__all__ = ["TrainBackend", "build_backend"]
