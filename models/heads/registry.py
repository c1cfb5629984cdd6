"""Task heads by task type."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from models.heads.base import TaskHead

if TYPE_CHECKING:
    from models.config import ModelConfig

_HEADS: dict[str, type[TaskHead]] = {}


def register_head(task: str) -> Callable[[type[TaskHead]], type[TaskHead]]:
    """Register a :class:`TaskHead` subclass for ``task``; a task can be taken once."""

    def decorator(cls: type[TaskHead]) -> type[TaskHead]:
        if task in _HEADS:
            raise ValueError(f"a head for task {task!r} is already registered ({_HEADS[task].__name__})")
        _HEADS[task] = cls
        return cls

    return decorator


def head_names() -> list[str]:
    return list(_HEADS)


def build_head(task: str, *, cfg: ModelConfig, in_channels: int, num_classes: int, name: str | None = None) -> TaskHead:
    """A head of task type ``task`` for the task named ``name`` (default: the type)."""
    if task not in _HEADS:
        raise ValueError(f"no head registered for task {task!r}; registered: {head_names()}")
    if num_classes < 1:
        raise ValueError(f"task {name or task!r}: the label space has {num_classes} classes; need at least 1")
    head = _HEADS[task](cfg=cfg, in_channels=in_channels, num_classes=num_classes)
    head.task_name = name or task
    return head
