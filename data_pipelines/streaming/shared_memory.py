"""Tensors that leave a data-loader worker: allocated in shared memory from the start.

Handing a tensor to the trainer's process moves it into shared memory, a full copy;
writing results straight into a shared-memory tensor saves that copy (torch's
``default_collate`` does the same for the batches it stacks).
"""
from __future__ import annotations

import torch
from torch.utils.data import get_worker_info


def empty_for_transport(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in shared memory when called in a data-loader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)
