"""What goes wrong with checkpoints, as errors the entry point reports in one line."""
from __future__ import annotations


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message is one line."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be loaded into this job (other model, corrupt, unsafe)."""
