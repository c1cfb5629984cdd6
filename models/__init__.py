"""Multi-task vision model: shared backbone + FPN, one registered head per task."""
from models.config import ModelConfig
from models.multitask import MultiTaskModel, build_model

__all__ = ["ModelConfig", "MultiTaskModel", "build_model"]
