"""Task heads; importing this package registers all of them."""
from models.heads import classification, detection, instance_mask, keypoints, semantic  # noqa: F401  (registration)
from models.heads.base import TaskHead
from models.heads.registry import build_head, head_names, register_head

__all__ = ["TaskHead", "build_head", "head_names", "register_head"]
