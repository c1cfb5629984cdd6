"""DistributedDataParallel + AdamW, checkpointed with torch.distributed.checkpoint."""
from __future__ import annotations

import contextlib
import inspect
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from trainer.backends.base import TrainBackend
from trainer.checkpoint import read_dcp, write_dcp, write_dcp_async
from trainer.optim import build_optimizer, build_scheduler
from trainer.config import OptimConfig


def forward_buffer_sync(enabled: bool) -> dict[str, bool]:
    """DDP's keyword for re-broadcasting buffers before every forward: torch 2.14 renamed
    ``broadcast_buffers`` to ``forward_sync_buffers``; the CUDA images of GPU clusters
    often carry an older torch, which knows only the old name."""
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return {name: enabled}


class DDPBackend(TrainBackend):
    def __init__(self, model: nn.Module, *, optim: OptimConfig, max_steps: int, device: torch.device,
                 async_save: bool = False, checkpoint_format: str = "raw") -> None:
        # Every head takes part in every forward (exact zeros for absent tasks), so no
        # find_unused_parameters graph walk is needed. The model's buffers are constants
        # (normalisation mean/std, frozen-BN statistics), equal on every rank from the start
        # (DDP broadcasts them once here): re-broadcasting them before every forward would
        # add a collective and a synchronisation point per step (measured, bench/step_overhead.py).
        # One process: DDP would only copy every gradient into its buckets and all-reduce
        # them with itself.
        self.model = model if dist.get_world_size() == 1 else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **forward_buffer_sync(False))
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, max_steps=max_steps)
        self.grad_clip = optim.grad_clip
        # When the last step's gradients are freed. On GPU right after the optimizer step, so
        # that the next forward's activations can reuse their memory. On CPU just before the
        # next backward: freed at once, glibc hands those megabytes back to the OS and the
        # backward faults them in again page by page (10% of a CPU step here, gone when
        # MALLOC_TRIM_THRESHOLD_ keeps them; bench/step_overhead.py).
        self._free_grads_after_step = device.type != "cpu"
        self._grads_to_free = False
        # Created on every rank in the same order (a collective); used by background writes.
        self._save_group = dist.new_group(backend="gloo") if async_save else None
        self._checkpoint_format = checkpoint_format  # CheckpointConfig.format: DCP storage

    @property
    def module(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def micro_batch_context(self, *, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if self._grads_to_free:
            self.optimizer.zero_grad(set_to_none=True)
            self._grads_to_free = False
        loss.backward()

    def optimizer_step(self) -> torch.Tensor:
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # Gradients are all-reduced, so every rank takes the same decision. Reading the norm
        # is one host sync per step: a NaN update would poison the weights and Adam's moments.
        self.last_step_applied = bool(torch.isfinite(grad_norm))
        if self.last_step_applied:
            self.optimizer.step()
        if self._free_grads_after_step:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self._grads_to_free = True
        self.scheduler.step()
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """This rank's checkpoint state: model and optimizer (DCP state dicts), LR schedule,
        plus ``extra``; the very tensors :meth:`save` writes and :meth:`load` fills in."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), **extra}

    def save(self, directory: Path, extra: dict[str, Any], *, background: bool | None = None) -> Future | None:
        """Write :meth:`state` to ``directory`` (DCP). ``background``: write in a background
        thread and return its future (needs ``async_save=True``); ``None``: as constructed."""
        if background is None:
            background = self._save_group is not None
        if background:
            if self._save_group is None:
                raise ValueError("DDPBackend.save(background=True) needs a backend built with async_save=True")
            return write_dcp_async(self.state(extra), directory, process_group=self._save_group,
                                   storage_format=self._checkpoint_format)
        write_dcp(self.state(extra), directory, storage_format=self._checkpoint_format)
        return None

    @staticmethod
    def load_model_weights(model: nn.Module, directory: Path) -> None:
        """Only the model's weights from one of our DCP checkpoints, for evaluation and
        inference (collective): DCP reads just the keys asked for, never the optimizer state."""
        state = {"model": get_model_state_dict(model)}
        read_dcp(state, directory)
        set_model_state_dict(model, state["model"])

    def load(self, directory: Path, extra: dict[str, Any]) -> None:
        state = self.state(extra)
        read_dcp(state, directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in extra:
            extra[key] = state[key]
