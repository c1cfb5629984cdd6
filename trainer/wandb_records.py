"""Read the history rows of an offline W&B run file (``run-<id>.wandb``) without W&B's servers.

wandb 0.31 ships no public local reader. The file is a LevelDB-style log: a 7-byte
header (``:W&B``, u16 magic, u8 version), then 32 KiB blocks of records, each
``u32 crc | u16 length | u8 type`` (1 full, 2 first, 3 middle, 4 last) + payload, zero
padding at block ends; a reassembled payload is a ``wandb_internal_pb2.Record``.
Used by ``polytask`` users without network and by the tests to read what was logged.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER_LEN = 7
_BLOCK = 32 * 1024
_RECORD_HEADER = 7  # crc u32, length u16, type u8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = _HEADER_LEN, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _RECORD_HEADER:  # zero padding at the block end
            pos += left_in_block
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + _RECORD_HEADER])
        pos += _RECORD_HEADER
        chunk = data[pos:pos + length]
        pos += length
        if rtype == _FULL:
            yield chunk
        elif rtype == _FIRST:
            pending = chunk
        elif rtype == _MIDDLE:
            pending += chunk
        elif rtype == _LAST:
            yield pending + chunk
            pending = b""
        elif rtype == 0 and length == 0:  # padding inside a block: skip to the next block
            pos += left_in_block - _RECORD_HEADER
        else:
            raise ValueError(f"corrupt W&B run file: record type {rtype} at byte {pos}")


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """All history rows (``wandb.log`` calls) of a run file, values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or ".".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def find_run_file(run_dir: str | Path) -> Path:
    """The newest ``run-*.wandb`` under ``<run_dir>/wandb``."""
    files = sorted(Path(run_dir, "wandb").glob("*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}/wandb: no offline W&B run file")
    return files[-1]
