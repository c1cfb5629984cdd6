"""Multi-task vision model: shared backbone + FPN, one registered head per task."""
from typing import Any

from models.config import ModelConfig


def __getattr__(name: str) -> Any:
    # The model is imported on first use (PEP 562), so that importing models.config, which
    # the launcher does to validate a config, does not import torch.
    if name in ("MultiTaskModel", "build_model"):
        from models import multitask

        return getattr(multitask, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = ["ModelConfig", "MultiTaskModel", "build_model"]
