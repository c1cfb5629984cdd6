"""Audit trail: the keys of the samples each rank trained on, one JSON line per step.

``<run_dir>/audit/rank_<r>.jsonl``, lines ``{"step": N, "keys": ["<source>/<key>", ...]}``.
A resumed run appends to the same file, so a duplicate or a gap across an interruption
shows up as a repeated or missing step (and repeated or missing keys).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class AuditWriter:
    """Appends one line per optimizer step; each line is flushed to the OS as written,
    so a killed run loses at most the line being written."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.path = Path(run_dir) / "audit" / f"rank_{rank}.jsonl"
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
