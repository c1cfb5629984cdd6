"""Raw shard sample -> training sample: decode, then the source's transforms with
randomness seeded by the sample's identity.

Seeding each sample's augmentation by (seed, source, epoch, shard, index) rather than
by a running generator makes it independent of which rank, reader or data-loader
worker prepares the sample, and of resumes: the same sample in the same epoch is
augmented the same way in every run.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from data_pipelines.streaming.decode import decode_sample
from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.streaming.seeding import derive_seed


class SamplePreparer:
    """Callable; raises ``ValueError`` (naming shard, key and problem) on bad data."""

    def __init__(
        self,
        manifests: list[Manifest],
        *,
        label_space: LabelSpace,
        transforms: dict[str, Callable[[dict], dict]],
        decode_sizes: dict[str, int | None] | None = None,
        seed: int,
    ) -> None:
        self.manifests = {m.name: m for m in manifests}
        self.label_space = label_space
        self.transforms = transforms
        # Per source, TransformConfig.decode_size() of its transforms; absent: full size.
        self.decode_sizes = decode_sizes or {}
        self.seed = seed

    def __call__(self, raw: dict, *, source: str, epoch: int, shard: int, index: int) -> dict:
        sample = decode_sample(
            raw, manifest=self.manifests[source], label_space=self.label_space,
            decode_size=self.decode_sizes.get(source),
        )
        # fork_rng: with num_workers=0 this runs in the trainer's process, whose RNG
        # (dropout, ...) must not move.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, source, "augment", epoch, shard, index))
            return self.transforms[source](sample)
