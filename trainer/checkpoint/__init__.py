"""Checkpoints: the manager (:mod:`manager`: atomic step directories, ``latest``, pruning),
DCP reading and writing (:mod:`dcp_io`) over raw tensor storage (:mod:`raw_storage`), and
the training loop's own state as Stateful parts (:mod:`parts`). The ``checkpoint`` config
section is :class:`trainer.config.CheckpointConfig`."""
from trainer.checkpoint.dcp_io import mismatch_error, read_dcp, write_dcp, write_dcp_async
from trainer.checkpoint.errors import CheckpointLoadError, CheckpointSaveError
from trainer.checkpoint.manager import META_NAME, Checkpointer

__all__ = [
    "META_NAME", "CheckpointLoadError", "CheckpointSaveError", "Checkpointer",
    "mismatch_error", "read_dcp", "write_dcp", "write_dcp_async",
]
