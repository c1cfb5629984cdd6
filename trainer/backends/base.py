"""What the training loop needs from a distributed backend (DDP, DeepSpeed ZeRO)."""
from __future__ import annotations

import contextlib
from concurrent.futures import Future
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainBackend(ABC):
    """Owns the wrapped model, the optimizer and the LR schedule.

    The loop calls, per optimizer step: ``micro_batch_context(last)`` around each
    micro-batch's forward and backward, ``backward(loss)``, then ``optimizer_step()``.
    Checkpoints: ``save(dir, extra)`` writes this rank's part of model/optimizer/schedule
    plus the loop's ``extra`` state; ``load(dir, extra)`` restores them in place.
    """

    #: the wrapped model (call it for forward passes)
    model: nn.Module

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped MultiTaskModel."""

    def full_parameters(self) -> contextlib.AbstractContextManager[nn.Module]:
        """(Collective) the unwrapped model with every parameter whole on this rank, for
        evaluation and replica digests. Only ZeRO-3, which partitions parameters, differs."""
        return contextlib.nullcontext(self.module)

    @abstractmethod
    def micro_batch_context(self, *, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; gradient sync happens only on the last one."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def optimizer_step(self) -> torch.Tensor:
        """Clip, step, zero the gradients, advance the schedule; returns the global grad
        norm (the same on every rank), non-finite when the gradients were. Sets
        :attr:`last_step_applied`."""

    #: Whether the last ``optimizer_step`` updated the weights. With a non-finite norm it
    #: should not have; a backend that did anyway makes the trainer stop at once.
    last_step_applied: bool = True

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> Future | None:
        """Write this rank's part; or start writing it and return a future (async save)."""

    @abstractmethod
    def load(self, directory: Path, extra: dict[str, Any]) -> None: ...

    @staticmethod
    @abstractmethod
    def load_model_weights(model: nn.Module, directory: Path) -> None:
        """Only the model's weights from a checkpoint of this backend (evaluation, inference)."""
