"""The infinite training stream: one webdataset pipeline per source, mixed by a TaskSampler.

Seeding: every (seed, rank, dataloader worker) gets its own seeds for shard resampling,
the shuffle buffer and the source sampler, so no two ranks/workers read the same
sequence and the same (seed, rank, num_workers) reads the same sequence every run.
Shards are resampled with replacement (no epochs yet), so ranks and workers never need
equal shard counts and never run dry.
"""
from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.decode import decode_sample
from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.task_sampler import TaskSampler


class MixedSourceStream(IterableDataset):
    """Yields transformed per-sample dicts forever; ``weights`` are per source name."""

    def __init__(
        self,
        manifests: list[Manifest],
        *,
        label_space: LabelSpace,
        weights: dict[str, float],
        transform: Callable[[dict], dict],
        seed: int,
        rank: int,
        shuffle_buffer: int,
    ) -> None:
        super().__init__()
        self.manifests = manifests
        self.label_space = label_space
        self.weights = weights
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        streams = {
            m.name: iter(self._source_pipeline(m, seed=derive_seed(self.seed, self.rank, worker, m.name)))
            for m in self.manifests
        }
        sampler = TaskSampler(self.weights, seed=derive_seed(self.seed, self.rank, worker, "sampler"))
        while True:
            yield next(streams[sampler.sample()])

    def _source_pipeline(self, manifest: Manifest, *, seed: int) -> wds.DataPipeline:
        return wds.DataPipeline(
            # worker_seed: our seed already encodes rank and worker; webdataset's default
            # would mix in its own guess of the rank from the environment.
            wds.ResampledShards(manifest.shard_urls(), seed=seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            # Shuffle raw bytes, before decoding: a buffer of encoded samples is ~10x smaller.
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed)),
            wds.map(functools.partial(self._prepare, manifest=manifest)),
        )

    def _prepare(self, raw: dict, *, manifest: Manifest) -> dict:
        return self.transform(decode_sample(raw, manifest=manifest, label_space=self.label_space))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes (unlike ``hash`` of a str)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
