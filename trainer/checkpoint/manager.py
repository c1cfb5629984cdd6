"""The checkpoint manager: when to save, atomic step directories, ``latest``, pruning.

What goes into a checkpoint is the caller's (the backend writes its model, optimizer and
schedule; the loop's own parts go beside them, :mod:`trainer.checkpoint.parts`); how DCP
files are read and written is :mod:`trainer.checkpoint.dcp_io`.

Layout: ``<run.dir>/checkpoints/step_<N>/`` (``.metadata``, one ``.distcp`` of raw tensor
bytes per rank (``raw_storage``; DCP's own with ``checkpoint.format: dcp``), ``meta.json``) and
``checkpoints/latest``, a symlink to the newest complete one.

Atomicity: every rank writes into ``step_<N>.partial``; only after all ranks finished
(DCP's save is collective) does rank 0 write ``meta.json``, rename the directory and
swap ``latest`` with an atomic rename. A crash at any point leaves the previous
checkpoint and ``latest`` untouched; a stale ``.partial`` is deleted by the next save.
A full disk during a save is one error line (free and needed bytes), and the partial is
removed at once. If ``latest`` is lost or damaged anyway (a copy without links, a hand
edit), :meth:`Checkpointer.latest` falls back to the newest complete ``step_<N>`` with a
warning, or refuses; it never reports "no checkpoint" while checkpoints are there.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from trainer.config import CheckpointConfig
from trainer.checkpoint.errors import CheckpointLoadError, CheckpointSaveError

log = logging.getLogger(__name__)


_STEP_DIR = re.compile(r"^step_(\d+)$")

META_NAME = "meta.json"


class Checkpointer:
    def __init__(self, *, run_dir: str | Path, cfg: CheckpointConfig, is_main: bool) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.is_main = is_main
        self._pending: tuple[int, Path, dict[str, Any], Future, float] | None = None
        self._saved_step: int | None = None
        # Deleting old checkpoints (GBs on a shared filesystem) happens beside training, in
        # one thread at a time; a request while it runs makes it prune once more afterwards.
        self._pruner: threading.Thread | None = None
        self._prune_lock = threading.Lock()
        self._prune_requested = False
        self._pruning = False

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
        with self._disk_full_is_one_line(step, partial):
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
        self._pending = None
        with self._disk_full_is_one_line(step, partial):
            future.result()  # re-raises a failed write
        self._finalize(step, partial, meta)
        log.info("async checkpoint step_%d written in the background in %.1f s", step, time.perf_counter() - started)

    def _finalize(self, step: int, partial: Path, meta: dict[str, Any]) -> None:
        dist.barrier()  # every rank's shard is on disk
        final = self.root / f"step_{step}"
        if self.is_main:
            with self._disk_full_is_one_line(step, partial):
                _write_json_durably(partial / META_NAME, {"step": step, **meta})
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            _point_link(self.root, "latest", final.name)
            self._request_prune()
            log.info("checkpoint saved: %s", final)
        dist.barrier()

    def has_step(self, step: int) -> bool:
        """This job saved (or is saving) ``step``. From memory, not the filesystem, so every
        rank gives the same answer (a shared filesystem may show a rename late)."""
        return self._saved_step == step

    @contextlib.contextmanager
    def _disk_full_is_one_line(self, step: int, partial: Path) -> Iterator[None]:
        """No space (or quota) while writing ``partial``: remove it, so the full disk gets
        its space back, and raise one line with the bytes needed and free. DCP's collective
        save raises this on every rank (each removes the partial: harmless); other errors
        pass through unchanged."""
        try:
            yield
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            what = _disk_full_cause(e, partial)
            if what is None:
                raise
            # The failed writer's frames may hold its file open (torch.save does): an unlinked
            # open file keeps its space, so free them before removing the partial.
            for failed in (e, e.__cause__, e.__context__):
                if failed is not None:
                    traceback.clear_frames(failed.__traceback__)
            written = _tree_bytes(partial)
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointSaveError(self._disk_full_message(step, what, written)) from None

    def _disk_full_message(self, step: int, what: str, written: int) -> str:
        previous = self._latest_link_target()
        previous_bytes = _tree_bytes(previous) if previous is not None else 0
        if previous is not None and previous_bytes > written:  # checkpoints of one run: about one size
            needed = f"needs about {_fmt_bytes(previous_bytes, f'the size of {previous.name}')}"
        else:
            needed = f"needs more than {_fmt_bytes(written, 'written before the disk filled')}"
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        kept = f"checkpoints/latest still points at {previous.name}" if previous else "no earlier checkpoint"
        return (f"checkpoint step_{step}: {what}: {needed}, has {_fmt_bytes(free, 'after removing the partial')} "
                f"free; {kept}")

    def resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` picks: :meth:`latest` for "auto", the named
        path, or None for "never" (and for "auto" in a fresh run)."""
        resume = self.cfg.resume
        if resume == "never":
            return None
        return self.latest() if resume == "auto" else Path(resume)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the target of ``checkpoints/latest`` if complete.
        If ``latest`` is missing, dangling or points at an incomplete step while complete
        ``step_<N>`` directories exist, the newest of them, with a warning; if only
        incomplete ones exist, :class:`CheckpointLoadError` naming them. None only when
        there is no ``step_<N>`` directory at all (a fresh run)."""
        target = self._latest_link_target()
        if target is not None and _why_incomplete(target) is None:
            return target
        steps = self._step_dirs()
        if not steps:
            return None
        link = self.root / "latest"
        if target is not None:
            problem = f"points at {target.name}, which is incomplete ({_why_incomplete(target)})"
        elif link.is_symlink():
            problem = f"points at {os.readlink(link)}, which does not exist"
        else:
            problem = "is missing"
        for _, path in reversed(steps):
            if _why_incomplete(path) is None:
                log.warning("%s %s; resuming from %s, the newest complete checkpoint there",
                            link, problem, path)
                return path
        found = ", ".join(f"{p.name} ({_why_incomplete(p)})" for _, p in steps)
        raise CheckpointLoadError(
            f"{link} {problem}, and no checkpoint in {self.root} is complete: {found}; not starting over "
            f"on top of them (move them away, or set checkpoint.resume=never or a checkpoint path)")

    def _latest_link_target(self) -> Path | None:
        link = self.root / "latest"
        return link.resolve() if link.exists() else None

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """``step_<N>`` directories (never ``.partial`` ones), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())

    def read_meta(self, path: str | Path) -> dict[str, Any]:
        meta_file = Path(path) / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a complete polytask checkpoint (no {META_NAME})")
        return json.loads(meta_file.read_text())

    def mark_best(self, step: int) -> None:
        """Point ``checkpoints/best`` at ``step_<step>``, which pruning then keeps, and prune
        again: the save of ``step`` pruned while ``best`` still spared the previous best."""
        if self.is_main:
            _point_link(self.root, "best", f"step_{step}")
            self._request_prune()

    def finish(self) -> None:
        """Every save complete and old checkpoints deleted (collective): before the job ends,
        only the ``keep_last`` newest steps and ``best`` are left."""
        self.poll(wait=True)
        if self.is_main and self.root.is_dir():
            self._request_prune()  # whatever re-pointed ``best`` last, nothing stale is left
        self._join_pruner()

    def _request_prune(self) -> None:
        """Prune in the background (rank 0); if a prune is running, it runs once more when done,
        so that a ``best`` re-pointed meanwhile is honoured without blocking the loop."""
        with self._prune_lock:
            self._prune_requested = True
            if self._pruning:
                return
            self._pruning = True
        self._pruner = threading.Thread(target=self._prune_while_requested, name="checkpoint-prune", daemon=True)
        self._pruner.start()

    def _prune_while_requested(self) -> None:
        while True:
            with self._prune_lock:
                if not self._prune_requested:
                    self._pruning = False
                    return
                self._prune_requested = False
            self._prune()

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _prune(self) -> None:
        """Delete all but the ``keep_last`` newest ``step_<N>``, sparing the target of ``best``
        (read per directory: ``mark_best`` may re-point it meanwhile)."""
        for _, old in self._step_dirs()[: -self.cfg.keep_last]:
            if old.resolve() != self._best_target():
                shutil.rmtree(old, ignore_errors=True)

    def _best_target(self) -> Path | None:
        link = self.root / "best"
        return link.resolve() if link.is_symlink() else None


def _why_incomplete(path: Path) -> str | None:
    """None if ``path`` holds a complete checkpoint: a readable ``meta.json`` (written last,
    by rank 0) and the backend's own index (DCP's ``.metadata``; DeepSpeed's directory and
    the DCP part beside it). Otherwise what is missing, for the log."""
    try:
        meta = json.loads((path / META_NAME).read_text())
    except FileNotFoundError:
        return f"no {META_NAME}"
    except (OSError, ValueError) as e:
        return f"unreadable {META_NAME}: {e}"
    if not isinstance(meta, dict):
        return f"unreadable {META_NAME}: not an object"
    if meta.get("backend", "ddp") == "deepspeed":
        if not (path / "deepspeed").is_dir():
            return "no deepspeed/ directory"
        return None if (path / "extra" / ".metadata").is_file() else "no extra/.metadata"
    return None if (path / ".metadata").is_file() else "no .metadata"


_NEARLY_FULL = 1 << 20  # bytes available below which a failed write is taken for a full disk


def _disk_full_cause(exc: BaseException, partial: Path) -> str | None:
    """What filled up, if ``exc`` comes from a full disk: an ENOSPC / EDQUOT error in it, its
    causes or (DCP) any rank's failure; or, since ``torch.save`` (DeepSpeed's writer) turns
    ENOSPC into a RuntimeError without an errno, any failure while the disk has (almost) no
    space left. None for other errors."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{os.strerror(e.errno)} writing {e.filename or partial}"
        if isinstance(e, CheckpointException):
            todo.extend(failure for failure, _trace in e.failures.values())
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    where = partial if partial.exists() else partial.parent
    if isinstance(exc, (Exception, CheckpointException)) and where.exists() and shutil.disk_usage(where).free < _NEARLY_FULL:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the disk is full writing {partial} ({type(exc).__name__}: {first})"
    return None


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _fmt_bytes(n: int, note: str) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB, {note})"


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
