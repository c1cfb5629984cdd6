"""Reading and writing DCP checkpoints safely: tensors as raw bytes (:mod:`raw_storage`) or,
with ``checkpoint.format: dcp``, in DCP's own files; other values unpickled with
``weights_only=True``, and one error listing what does not
match the job before DCP fails somewhere inside its planner. The backends call it for
their state; the manager does not."""
from __future__ import annotations

import pickle
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from trainer.checkpoint.errors import CheckpointLoadError
from trainer.config import CHECKPOINT_FORMATS
from trainer.checkpoint.raw_storage import RawTensorReader, RawTensorWriter


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles non-tensor values (step counters, scheduler state) with
    ``weights_only=False``; a checkpoint from elsewhere must not run code, so we use
    ``weights_only=True`` for those too (tensors already load that way)."""

    def load_bytes(self, read_item: ReadItem, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def write_dcp(state: dict[str, Any], directory: Path, *, storage_format: str = "raw") -> None:
    """This rank's part of ``state`` into ``directory`` (collective), in ``storage_format``
    (``CheckpointConfig.format``)."""
    dcp.save(state, storage_writer=_storage_writer(directory, storage_format))


def write_dcp_async(state: dict[str, Any], directory: Path, *, process_group: dist.ProcessGroup,
                    storage_format: str = "raw") -> Future:
    """Like :func:`write_dcp`, but the state is copied to host memory and written by a
    background thread; its collectives use ``process_group`` (a gloo group of its own, so
    they never interleave with the training's)."""
    return dcp.async_save(state, storage_writer=_storage_writer(directory, storage_format), process_group=process_group)


def _storage_writer(directory: Path, storage_format: str) -> FileSystemWriter:
    """``raw``: our raw tensor bytes; ``dcp``: DCP's own files (a ``torch.save`` per tensor),
    which stock tools such as ``format_utils.dcp_to_torch_save`` read. :func:`read_dcp`
    reads both."""
    if storage_format == "raw":
        return RawTensorWriter(str(directory))
    if storage_format == "dcp":
        return FileSystemWriter(str(directory))
    raise ValueError(f"checkpoint.format must be one of {list(CHECKPOINT_FORMATS)}, got {storage_format!r}")


def read_dcp(state: dict[str, Any], directory: str | Path) -> None:
    """Load ``directory`` into ``state`` in place (collective); tensors and other values
    both with ``weights_only=True``. Errors name the checkpoint and the first failure."""
    _check_compatible(state, directory)
    try:
        dcp.load(state, storage_reader=RawTensorReader(str(directory)), planner=WeightsOnlyLoadPlanner())
    except CheckpointException as e:  # a BaseException carrying every rank's traceback
        rank, (exc, _trace) = next(iter(sorted(e.failures.items())))
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointLoadError(f"{directory}: cannot load (rank {rank}): {type(exc).__name__}: {first_line}") from None


def _check_compatible(state: dict[str, Any], directory: str | Path) -> None:
    """A checkpoint of another model or config: one error listing what does not match,
    before DCP fails somewhere inside its planner."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        stored = RawTensorReader(str(directory)).read_metadata().state_dict_metadata
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointLoadError(f"{directory}: cannot read the checkpoint's metadata: {e}") from None
    # Tensors only: DCP's naming of tensor leaves is the dotted dict path, for sure.
    wanted = {k: v for k, v in _flatten(state).items() if isinstance(v, torch.Tensor)}
    missing = sorted(k for k in wanted if k not in stored)
    shape = sorted(
        f"{k}: checkpoint {list(stored[k].size)} vs job {list(v.shape)}"
        for k, v in wanted.items()
        if k in stored and isinstance(stored[k], TensorStorageMetadata)
        and tuple(stored[k].size) != tuple(v.shape)
    )
    if missing or shape:
        raise mismatch_error(directory, missing=missing, shape=shape)


def mismatch_error(directory: str | Path, *, missing: list[str], shape: list[str],
                   unexpected: list[str] | None = None) -> CheckpointLoadError:
    """One error listing every key of the job missing in a checkpoint, every shape that
    differs (``"key: checkpoint [..] vs job [..]"``) and, where the checkpoint should hold
    nothing else, its keys the job does not have."""
    lines = [f"{directory}: checkpoint does not match this job (another model or config?)"]
    for label, items, sep in (("missing in checkpoint", missing, ", "), ("not in this job", unexpected or [], ", "),
                              ("shape mismatch", shape, "; ")):
        if items:
            lines.append(f"  {label} ({len(items)}): {sep.join(items[:10])}{' ...' if len(items) > 10 else ''}")
    return CheckpointLoadError("\n".join(lines))


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP's key naming: nested dict keys joined with '.'; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
