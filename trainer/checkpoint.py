"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: ``<run.dir>/checkpoints/step_<N>/`` (``.metadata``, one ``.distcp`` of raw tensor
bytes per rank (``trainer/checkpoint_storage.py``), ``meta.json``) and
``checkpoints/latest``, a symlink to the newest complete one.

Atomicity: every rank writes into ``step_<N>.partial``; only after all ranks finished
(DCP's save is collective) does rank 0 write ``meta.json``, rename the directory and
swap ``latest`` with an atomic rename. A crash at any point leaves the previous
checkpoint and ``latest`` untouched; a stale ``.partial`` is deleted by the next save.
"""
from __future__ import annotations


import json
import logging
import os
import pickle
import re
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._nested_dict import set_element

from trainer.checkpoint_storage import RawTensorReader, RawTensorWriter

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    # "auto": continue from checkpoints/latest when present; "never"; or a checkpoint path.
    resume: str = "auto"
    # DDP only: write in a background thread while training goes on; the checkpoint becomes
    # `latest` at the first step boundary after every rank finished writing.
    async_save: bool = False

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


_STEP_DIR = re.compile(r"^step_(\d+)$")
META_NAME = "meta.json"


class Checkpointer:
    def __init__(self, *, run_dir: str | Path, cfg: CheckpointConfig, is_main: bool) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.is_main = is_main
        self._pending: tuple[int, Path, dict[str, Any], Future, float] | None = None
        self._saved_step: int | None = None
        # Deleting old checkpoints (GBs on a shared filesystem) happens beside training.
        self._pruner: threading.Thread | None = None

    def should_save(self, step: int, *, last: bool) -> bool:
        return last or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def save(self, step: int, write: Callable[[Path], Future | None], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it; ``write(dir)`` writes this rank's part of the
        checkpoint into ``dir`` (e.g. :func:`write_dcp`), or starts writing it and returns a
        future (async save): then the checkpoint is finalised by a later :meth:`poll`.
        Returns the final path."""
        self.poll(wait=True)  # one save in flight at a time
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        started = time.perf_counter()
        future = write(partial)
        self._saved_step = step
        if future is None:
            self._finalize(step, partial, meta)
        else:
            self._pending = (step, partial, meta, future, started)
        return final

    def poll(self, *, wait: bool = False) -> None:
        """Finalise a pending async save once every rank's write is done (collective: call
        it at the same step on every rank; ``wait`` blocks until then)."""
        if self._pending is None:
            return
        step, partial, meta, future, started = self._pending
        done = torch.tensor([1 if (wait or future.done()) else 0])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # every rank agrees on when
        if not done.item():
            return
        future.result()  # re-raises a failed write
        self._pending = None
        self._finalize(step, partial, meta)
        log.info("async checkpoint step_%d written in the background in %.1f s", step, time.perf_counter() - started)

    def _finalize(self, step: int, partial: Path, meta: dict[str, Any]) -> None:
        dist.barrier()  # every rank's shard is on disk
        final = self.root / f"step_{step}"
        if self.is_main:
            _write_json_durably(partial / META_NAME, {"step": step, **meta})
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            _point_link(self.root, "latest", final.name)
            self._join_pruner()
            self._pruner = threading.Thread(target=self._prune, name="checkpoint-prune", daemon=True)
            self._pruner.start()
            log.info("checkpoint saved: %s", final)
        dist.barrier()

    def has_step(self, step: int) -> bool:
        """This job saved (or is saving) ``step``. From memory, not the filesystem, so every
        rank gives the same answer (a shared filesystem may show a rename late)."""
        return self._saved_step == step

    def latest(self) -> Path | None:
        link = self.root / "latest"
        if not link.exists():
            return None
        target = link.resolve()
        return target if (target / META_NAME).is_file() else None

    def read_meta(self, path: str | Path) -> dict[str, Any]:
        meta_file = Path(path) / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a complete polytask checkpoint (no {META_NAME})")
        return json.loads(meta_file.read_text())

    def mark_best(self, step: int) -> None:
        """Point ``checkpoints/best`` at ``step_<step>``, which pruning then keeps."""
        if self.is_main:
            _point_link(self.root, "best", f"step_{step}")

    def finish(self) -> None:
        """Every save complete and old checkpoints deleted (collective): before the job ends."""
        self.poll(wait=True)
        self._join_pruner()

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _prune(self) -> None:
        best = (self.root / "best").resolve() if (self.root / "best").is_symlink() else None
        steps = sorted(
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        )
        for _, old in steps[: -self.cfg.keep_last]:
            if old.resolve() != best:
                shutil.rmtree(old, ignore_errors=True)


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be loaded into this job (other model, corrupt, unsafe)."""


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


def write_dcp(state: dict[str, Any], directory: Path) -> None:
    """This rank's part of ``state`` into ``directory`` (collective)."""
    dcp.save(state, storage_writer=RawTensorWriter(str(directory)))


def write_dcp_async(state: dict[str, Any], directory: Path, *, process_group: dist.ProcessGroup) -> Future:
    """Like :func:`write_dcp`, but the state is copied to host memory and written by a
    background thread; its collectives use ``process_group`` (a gloo group of its own, so
    they never interleave with the training's)."""
    return dcp.async_save(state, storage_writer=RawTensorWriter(str(directory)), process_group=process_group)


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


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _point_link(root: Path, link: str, target: str) -> None:
    """Atomically (re)point ``root/link`` at ``target``: a reader sees the old or the new."""
    tmp = root / f"{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)  # relative: the run directory can be moved
    os.replace(tmp, root / link)
