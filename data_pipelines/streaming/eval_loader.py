"""Exactly-once reading of validation sources, split over ranks and data-loader workers.

Samples are enumerated in one fixed order (sources as configured, shards and samples in
manifest order); sample ``i`` goes to slot ``i % (world_size * num_workers)``. Every sample
has exactly one slot, so nothing is read twice or dropped whatever the counts; shares may
differ by one sample, which evaluation (no per-step collectives) does not mind.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.streaming.collate import collate
from data_pipelines.streaming.decode import decode_sample, full_size_semantic
from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.schema import CLASS_LABEL_PREFIX, Batch
from data_pipelines.streaming.tar_samples import TarSamples
from data_pipelines.streaming.transforms import build_eval_transforms
from data_pipelines.streaming.config import TransformConfig


@dataclass(frozen=True)
class ImageRecord:
    """What maps a sample's predictions back to its source: ids and the original frame."""

    source: str
    image_id: int  # the image id in the source's own annotation file
    height: int  # original size; predictions are made on the resized image
    width: int
    semantic: torch.Tensor | None = None  # int64 [height, width] label-space indices, IGNORE_INDEX = unlabelled
    class_labels: dict[str, int] = field(default_factory=dict)  # classification task -> label-space index
    file_name: str | None = None  # the image's file name in its source, for per-image predictions


class EvalStream(IterableDataset):
    """Yields ``(transformed sample, ImageRecord)`` for this rank's and worker's share."""

    def __init__(
        self,
        manifests: list[Manifest],
        *,
        label_space: LabelSpace,
        transform: Callable[[dict], dict],
        decode_size: int | None = None,
        rank: int,
        world_size: int,
        max_images: int | None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifests = manifests
        self.label_space = label_space
        self.transform = transform
        self.decode_size = decode_size  # as training decodes (TransformConfig.decode_size())
        self.rank = rank
        self.world_size = world_size
        self.max_images = max_images

    def __iter__(self) -> Iterator[tuple[dict, ImageRecord]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        index = 0
        for manifest in self.manifests:
            for raw in source_samples(manifest, max_images=self.max_images):
                # Counted before the slot test, so every slot sees the same numbering;
                # other slots' samples are skipped undecoded.
                if index % slots == slot:
                    yield self._prepare(raw, manifest)
                index += 1

    def _prepare(self, raw: dict, manifest: Manifest) -> tuple[dict, ImageRecord]:
        sample = decode_sample(raw, manifest=manifest, label_space=self.label_space, decode_size=self.decode_size)
        image = json.loads(raw["json"])["image"]  # decode_sample checked it is there
        height, width = int(image["height"]), int(image["width"])
        # Dense targets are scored at the original size, before the resize: decoded again
        # only when the image (and with it the mask) was decoded at reduced size.
        semantic = sample["semantic"].as_subclass(torch.Tensor) if "semantic" in sample else None
        if semantic is not None and tuple(semantic.shape[-2:]) != (height, width):
            semantic = full_size_semantic(raw, manifest=manifest, label_space=self.label_space)
        record = ImageRecord(
            source=manifest.name,
            image_id=int(image["id"]),
            height=height,
            width=width,
            semantic=semantic,
            class_labels={key.removeprefix(CLASS_LABEL_PREFIX): int(value) for key, value in sample.items()
                          if key.startswith(CLASS_LABEL_PREFIX)},
            file_name=image.get("file_name"),
        )
        return self.transform(sample), record


def source_samples(manifest: Manifest, *, max_images: int | None) -> Iterator[dict]:
    """Raw samples of one source in manifest order; with ``max_images``, that many spread
    evenly over the whole source (a prefix of a class-sorted source, as ImageFolder
    conversions are, would hold one class only). Shards without a chosen sample are not
    opened."""
    total = manifest.num_samples
    chosen = None if max_images is None or max_images >= total else evenly_spaced(total, max_images)
    offset = 0
    for shard, url in zip(manifest.shards, manifest.shard_urls()):
        first, offset = offset, offset + shard.num_samples
        if chosen is not None and not any(first <= i < offset for i in chosen):
            continue
        # The training stream's shard reader: same sample grouping, failures located in the shard.
        for n, raw in enumerate(TarSamples(url), start=first):
            if chosen is None or n in chosen:
                yield raw


def evenly_spaced(total: int, count: int) -> set[int]:
    """``count`` of the indices ``0 .. total-1``, spread evenly (first one included)."""
    return {k * total // count for k in range(count)}


def expected_images(manifests: list[Manifest], *, max_images: int | None) -> dict[str, int]:
    """Images each source contributes to one evaluation, over all ranks."""
    return {m.name: m.num_samples if max_images is None else min(m.num_samples, max_images) for m in manifests}


def collate_eval(items: list[tuple[dict, ImageRecord]]) -> tuple[Batch, list[ImageRecord]]:
    samples, records = zip(*items)
    return collate(list(samples)), list(records)


def build_eval_loader(
    manifests: list[Manifest],
    *,
    label_space: LabelSpace,
    transforms: TransformConfig,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    max_images: int | None,
) -> DataLoader:
    """One pass over this rank's share, as ``(Batch, [ImageRecord])`` batches."""
    stream = EvalStream(
        manifests,
        label_space=label_space,
        transform=build_eval_transforms(transforms),
        decode_size=transforms.decode_size(),
        rank=rank,
        world_size=world_size,
        max_images=max_images,
    )
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_eval)
