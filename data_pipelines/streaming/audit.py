"""Audit trail: the keys of the samples each rank trained on, one JSON line per step.

``<run_dir>/audit/rank_<r>.jsonl``, lines ``{"step": N, "keys": ["<source>/<key>", ...]}``.
A resumed run appends to the same files after cutting them back to the step it resumes
from (:func:`cut_audit_trails`): the steps a killed run took after its last checkpoint were
thrown away with it, so the trail alone shows exactly what trained, each step once. A
duplicate or a gap in a trail is therefore a bug, never an interruption.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_TRAIL = re.compile(r"^rank_(\d+)\.jsonl$")


def audit_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "audit"


class AuditWriter:
    """Appends one line per optimizer step; each line is flushed to the OS as written,
    so a killed run loses at most the line being written."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.path = audit_dir(run_dir) / f"rank_{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def write(self, step: int, keys: list[str]) -> None:
        """Record that optimizer step ``step`` trained on the samples ``keys``."""
        self._file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "AuditWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_audit_trails(run_dir: str | Path, *, after_step: int) -> int:
    """Cut every rank's trail under ``run_dir`` after ``after_step``, the step the run
    (re)starts from (0: a fresh start). Every rank file, also those of ranks a resume on
    fewer ranks no longer has. Call it on one process before any rank writes a line.
    Returns the number of lines dropped; each cut trail is logged."""
    directory = audit_dir(run_dir)
    if not directory.is_dir():
        return 0
    dropped = 0
    for path in sorted(p for p in directory.iterdir() if _TRAIL.match(p.name)):
        dropped += cut_trail(path, after_step=after_step)
    return dropped


def cut_trail(path: Path, *, after_step: int) -> int:
    """Truncate ``path`` at its first line past ``after_step`` (or torn by a kill). Lines are
    in step order, since every resume cuts here first; truncating in place keeps this cheap
    for long trails. Returns the number of lines dropped."""
    offset = 0
    cut_at: int | None = None
    dropped_steps: list[int] = []
    torn = 0
    with open(path, "rb") as f:
        for raw in f:
            step = _line_step(raw)
            if cut_at is None and (step is None or step > after_step):
                cut_at = offset
            if cut_at is not None:
                if step is None:
                    torn += 1
                else:
                    dropped_steps.append(step)
            offset += len(raw)
    if cut_at is None:
        return 0
    os.truncate(path, cut_at)
    steps = f"steps {min(dropped_steps)}..{max(dropped_steps)}" if dropped_steps else "no step"
    log.warning("audit trail %s: dropped %d line(s) (%s%s) past step %d, where this run starts: "
                "the weights it continues from never saw them",
                path, len(dropped_steps) + torn, steps, f", {torn} torn" if torn else "", after_step)
    return len(dropped_steps) + torn


def _line_step(raw: bytes) -> int | None:
    """The step of one trail line; None for a torn or foreign line."""
    if not raw.endswith(b"\n"):
        return None  # the line being written when a run was killed
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None
