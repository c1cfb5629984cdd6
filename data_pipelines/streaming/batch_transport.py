"""How a batch travels from a data-loader worker to the trainer's process.

Every tensor sent from a worker becomes a shared-memory segment of its own, at a fixed
cost per tensor (a new segment, pre-allocated and page-faulted in, and a file
descriptor handed over a socket with an authentication round trip) that dwarfs copying
a few boxes. The worker therefore writes the whole batch, images as uint8 and every
per-sample target packed per key, into one shared-memory buffer; the trainer's process
takes views of it and converts the images to float32 there (a quarter of the bytes to
share; the same arithmetic as ``collate``, so both give the same :class:`Batch`).
For a CUDA trainer the buffer is pinned (the loader's pin-memory thread calls
:meth:`PackedBatch.pin_memory`) and crosses to the device in one non-blocking copy;
the views and the float conversion are then made on the device (uint8: a quarter of
the bytes a float32 batch would move).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from data_pipelines.streaming.collate import images_to_float, pad_to_batch, sample_images, target_keys
from data_pipelines.schema import CLASS_LABEL_PREFIX, Batch
from data_pipelines.streaming.shared_memory import empty_for_transport

_ALIGN = 64  # byte offset of every tensor in the buffer: any dtype may view it


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the buffer."""

    offset: int  # bytes
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        nbytes = self.dtype.itemsize
        for n in self.shape:
            nbytes *= n
        return buffer[self.offset : self.offset + nbytes].view(self.dtype).view(self.shape)


@dataclass
class PackedBatch:
    buffer: torch.Tensor  # uint8: the images (uint8), task mask and packed targets
    images: Slot
    task_mask: Slot
    keys: list[str]
    sources: list[str]
    # target key -> (indices of the samples that have it, their row counts, where the packed tensor lies)
    targets: dict[str, tuple[list[int], list[int], Slot]]
    # Each image's unpadded (height, width): a plain list, pickled with the rest, not a
    # tensor that would cost a shared-memory segment of its own.
    image_sizes: list[tuple[int, int]]

    def pin_memory(self) -> "PackedBatch":
        """The same batch with its buffer in page-locked memory (called by the data loader's
        pin-memory thread), so that the copy to the GPU is asynchronous."""
        return replace(self, buffer=self.buffer.pin_memory())


def _per_sample(key: str) -> bool:
    """Targets with one value per sample (semantic, class_label/<task>) are stacked; the
    others have one row per instance (or per class: coverage), concatenated."""
    return key == "semantic" or key.startswith(CLASS_LABEL_PREFIX)


def pack(samples: list[dict]) -> PackedBatch:
    """Transformed samples -> one buffer (in shared memory inside a data-loader worker)."""
    samples, image_sizes = pad_to_batch(samples)
    images = sample_images(samples)
    end = 0  # bytes placed so far

    def place(dtype: torch.dtype, shape: tuple[int, ...]) -> Slot:
        nonlocal end
        slot = Slot(end, dtype, shape)
        size = dtype.itemsize
        for n in shape:
            size *= n
        end += -(-size // _ALIGN) * _ALIGN
        return slot

    image_slot = place(torch.uint8, (len(images), *images[0].shape))
    mask_slot = place(torch.bool, (len(samples), *samples[0]["task_mask"].shape))
    parts = {}
    for key in target_keys(samples):
        have = [i for i, s in enumerate(samples) if key in s]
        if not have:
            continue
        values = [samples[i][key].as_subclass(torch.Tensor) for i in have]
        if _per_sample(key):
            shape, counts = (len(values), *values[0].shape), []
        else:
            shape, counts = (sum(len(v) for v in values), *values[0].shape[1:]), [len(v) for v in values]
        parts[key] = (have, counts, place(values[0].dtype, shape), values)

    buffer = empty_for_transport((end,), torch.uint8)
    # The resized images are HWC in memory (the uint8 resize kernel works on interleaved
    # pixels); numpy's copy de-interleaves them into the CHW batch twice as fast as
    # torch.stack's strided copy.
    image_out = image_slot.view(buffer).numpy()
    for i, image in enumerate(images):
        np.copyto(image_out[i], image.numpy())
    torch.stack([s["task_mask"] for s in samples], out=mask_slot.view(buffer))
    for key, (have, counts, slot, values) in parts.items():
        if _per_sample(key):
            torch.stack(values, out=slot.view(buffer))
        else:
            torch.cat(values, out=slot.view(buffer))
    targets = {key: (have, counts, slot) for key, (have, counts, slot, _) in parts.items()}
    return PackedBatch(buffer, image_slot, mask_slot, [s["key"] for s in samples], [s["source"] for s in samples],
                       targets, image_sizes)


def unpack(packed: PackedBatch, *, device: torch.device | str | None = None) -> Batch:
    """The :class:`Batch` ``collate`` would have made of the same samples, on ``device``
    (None: where the buffer is). Targets are views of the buffer (``.clone()`` one to keep
    it past the step without the buffer). Another device gets the whole buffer in one
    non-blocking copy, and the images are converted to float there."""
    buffer = packed.buffer if device is None else packed.buffer.to(device, non_blocking=True)
    targets: list[dict[str, torch.Tensor]] = [{} for _ in packed.keys]
    for key, (have, counts, slot) in packed.targets.items():
        values = slot.view(buffer)
        parts = values.unbind(0) if _per_sample(key) else values.split(counts)
        for i, part in zip(have, parts):
            targets[i][key] = part
    images = packed.images.view(buffer)
    return Batch(
        images=images_to_float(images, out=torch.empty(images.shape, dtype=torch.float32, device=buffer.device)),
        targets=targets,
        task_mask=packed.task_mask.view(buffer),
        keys=packed.keys,
        sources=packed.sources,
        image_sizes=torch.tensor(packed.image_sizes, dtype=torch.int64),
    )
