"""DCP storage for our checkpoints: tensors written as raw bytes, metadata read safely.

Why not DCP's ``FileSystemWriter`` as it is: it runs a whole ``torch.save`` (pickler, zip
records, dozens of small writes) for every tensor. Our DDP state has ~580 of them
(parameters, both Adam moments, per-parameter step counters), and that per-item cost made
a save 3-5x slower than one ``torch.save`` of the same tensors (bench/checkpoint_save.py).
Here each tensor is one write of its bytes; its dtype and shape travel in the metadata.
Planning, resharding, deduplication across ranks and async staging stay DCP's own: only
the two storage classes change.

Why not ``FileSystemReader.read_metadata``: it is a plain ``pickle.load`` of
``.metadata``, so a crafted checkpoint would run code on load. Ours unpickles with an
allow-list of DCP's metadata types and torch's dtype/size/layout constants, and then checks
that every item's bytes lie inside a file of the checkpoint directory (a crafted item path
such as ``/proc/self/environ`` would otherwise read any file into the weights).
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from torch.futures import Future

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed._shard._utils import narrow_tensor_by_index


@dataclass(frozen=True)
class RawItem:
    """Where one item's bytes are: ``relative_path`` at ``offset``, ``length`` bytes;
    ``dtype`` (torch's name, e.g. ``"float32"``) and ``shape`` for tensors, None for
    bytes items (non-tensor values, which DCP pickles itself)."""

    relative_path: str
    offset: int
    length: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


class RawTensorWriter(FileSystemWriter):
    """One ``.distcp`` file per rank holding its items back to back, fsynced before DCP
    writes ``.metadata`` (``sync_files``)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                    info = RawItem(file_name, offset, stream.tell() - offset)
                else:
                    tensor = data.detach().cpu().contiguous()
                    stream.write(_byte_view(tensor))
                    info = RawItem(file_name, offset, stream.tell() - offset,
                                   str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
                results.append(WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info))
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


class RawTensorReader(FileSystemReader):
    """Reads what :class:`RawTensorWriter` wrote, and checkpoints of DCP's own format
    (earlier polytask versions) through ``FileSystemReader``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, source=str(path)).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        check_storage_locations(metadata, str(self.path), source=str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        ours, others = [], []
        for req in plan.items:
            (ours if isinstance(self.storage_data[req.storage_index], RawItem) else others).append(req)
        if others:  # DCP's own format
            super().read_data(LoadPlan(others, plan.storage_data, plan.planner_data), planner).wait()
        by_file: dict[str, list] = {}
        for req in ours:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in by_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(path, "rb") as stream:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    info: RawItem = self.storage_data[req.storage_index]
                    stream.seek(info.offset)
                    if req.type == LoadItemType.BYTE_IO:
                        data = stream.read(info.length)
                        _check_length(len(data), info, path)
                        planner.load_bytes(req, io.BytesIO(data))
                        continue
                    dtype = getattr(torch, str(info.dtype), None)
                    if not isinstance(dtype, torch.dtype):
                        raise ValueError(f"{path}: {req.storage_index.fqn} has no valid dtype ({info.dtype!r})")
                    stored = torch.empty(info.shape, dtype=dtype)
                    _check_length(stream.readinto(_byte_view(stored)), info, path)
                    tensor = narrow_tensor_by_index(stored, req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise ValueError(f"{path}: {req.storage_index.fqn} holds {list(tensor.size())},"
                                         f" the job wants {list(target.size())}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


def check_storage_locations(metadata: Metadata, directory: str, *, source: str) -> None:
    """Every item's ``relative_path`` names a regular file inside ``directory`` (no absolute
    path, no ``..``, no symlink out of it), and its ``offset``/``length`` lie within that
    file; a tensor item's length is its dtype and shape's byte size. Raises ValueError
    naming the item otherwise. Applies to our RawItem and to DCP's own ``_StorageInfo``."""
    root = os.path.realpath(directory)
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        item = f"item {getattr(index, 'fqn', index)!r}"
        where = f"{source}: {item}"
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or rel.startswith(("/", "~")) or ".." in PurePosixPath(rel).parts:
            raise ValueError(f"{where} points at {rel!r}, outside the checkpoint directory; not loading it")
        if rel not in sizes:
            full = os.path.realpath(os.path.join(root, rel))
            if os.path.commonpath([root, full]) != root:
                raise ValueError(f"{where} points at {rel!r}, a symlink out of the checkpoint directory; not loading it")
            if not os.path.isfile(full):
                raise ValueError(f"{where} points at {rel!r}, which is not a file of the checkpoint")
            sizes[rel] = os.path.getsize(full)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0
                and offset + length <= sizes[rel]):
            raise ValueError(f"{os.path.join(directory, rel)}: truncated or crafted, {item} needs "
                             f"bytes [{offset}, {offset}+{length}), the file has {sizes[rel]}")
        if isinstance(info, RawItem) and info.dtype is not None:
            dtype = getattr(torch, str(info.dtype), None)
            shape = info.shape
            if not isinstance(dtype, torch.dtype) or not isinstance(shape, tuple) or not all(
                type(d) is int and d >= 0 for d in shape
            ):
                raise ValueError(f"{where}: invalid dtype {info.dtype!r} or shape {shape!r}")
            numel = 1
            for d in shape:
                numel *= d
            if numel * dtype.itemsize != length:
                raise ValueError(f"{where}: {length} bytes cannot hold a {info.dtype} tensor of shape {list(shape)}")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _check_length(got: int, info: RawItem, path: Any) -> None:
    if got != info.length:
        raise ValueError(f"{path}: truncated, {info.length} bytes expected at offset {info.offset}, {got} read")


_METADATA_TYPES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # DCP's own format
    (__name__, "RawItem"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch.layout pickles: a lookup by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("trainer.checkpoint_storage", "RawItem"):  # where it lived before 2026-12
            return RawItem
        if (module, name) in _METADATA_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{self.source}: refers to {module}.{name}, which checkpoint metadata"
                                     " never holds; not loading it (it could run code)")

