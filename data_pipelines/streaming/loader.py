"""Data config and the per-rank training loader the trainer pulls one batch per step from.

Trainer API: ``build_train_loader(cfg, rank=, world_size=) -> (loader, label_space,
manifests)``; ``loader.state_dict()`` / ``loader.load_state_dict(sd)`` (plain ints and
strings; load before iterating), ``loader.data_metrics()`` (``data/...`` floats) and
``loader.bad_sample_counts()`` / ``loader.check_bad_samples(summed)`` (the bad-sample
fraction of each source, judged over all ranks).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.bad_data import check_bad_fraction
from data_pipelines.streaming.batch_transport import unpack
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.data_metrics import data_metrics, source_counts
from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.label_space import LabelSpace, build_label_space, restrict_to_tasks
from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.streaming.prepare import SamplePreparer
from data_pipelines.schema import Batch
from data_pipelines.tasks import TaskSpec
from data_pipelines.streaming.seeding import derive_seed
from data_pipelines.streaming.stream import MixedSourceStream
from data_pipelines.streaming.stream_state import merge_worker_states
from data_pipelines.streaming.task_sampler import TaskSampler, strategy_weights
from data_pipelines.streaming.transforms import build_train_transforms
from data_pipelines.streaming.workers import resolve_num_workers

log = logging.getLogger(__name__)


def load_manifests(cfg: DataConfig) -> list[Manifest]:
    """The configured sources' manifests, in config order (which fixes the label space)."""
    manifests = []
    for i, source in enumerate(cfg.sources):
        try:
            manifests.append(load_manifest(source.path))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"DataConfig.sources[{i}].path: {e}") from e
    names = [m.name for m in manifests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Sample keys and label-space mappings are keyed by source name.
        raise ValueError(f"DataConfig.sources: source name(s) {duplicates} appear more than once")
    return manifests


def shard_urls(manifest: Manifest, source: SourceConfig, *, where: str) -> tuple[str, ...]:
    """The manifest's shard locations, or ``source.shards`` brace-expanded (webdataset's
    expansion, so ``::``-separated lists work too) over the same shards."""
    if source.shards is None:
        return tuple(manifest.shard_urls())
    urls = wds.shardlists.expand_urls(source.shards)
    if len(urls) != len(manifest.shards):
        raise ValueError(
            f"{where}.shards: {source.shards!r} expands to {len(urls)} URLs, "
            f"the manifest at {source.path} lists {len(manifest.shards)} shards"
        )
    return tuple(urls)


class TrainLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` over a :class:`MixedSourceStream` whose ``state_dict`` is
    the rank's stream position, independent of ``num_workers``.

    torchdata snapshots each worker's stream state with every batch it hands over
    (``snapshot_every_n_steps=1``), so the state matches the batches the trainer has
    received, not those prefetched; the workers' states are merged into one (each
    reader is built by one worker). ``load_state_dict`` sets the stream's start
    position before workers exist, so any worker count resumes it.
    """

    def __init__(self, dataset: MixedSourceStream, *, num_workers: int, generator: torch.Generator,
                 targets: dict[str, float], source_tasks: dict[str, list[str]],
                 device: torch.device | None = None) -> None:
        # Batches arrive on ``device`` (None: host memory): for CUDA pinned by the
        # pin-memory thread, then one non-blocking copy each (batch_transport.unpack).
        self.device = device
        with warnings.catch_warnings():
            # torchdata 0.11 calls a torch API that torch 2.14 deprecates, on every loader.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(
                dataset,
                batch_size=None,  # the stream yields whole batches
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                snapshot_every_n_steps=1,
                generator=generator,
                pin_memory=device is not None and device.type == "cuda",
            )
        self.targets = targets
        self.source_tasks = source_tasks
        self._iterating = False

    def __iter__(self) -> Iterator[Batch]:
        if self._iterating and self.num_workers > 0:
            # Persistent workers would resume past the batches they had prefetched and
            # drop them: restart them at the last batch handed out instead.
            self.load_state_dict(self.state_dict())
        self._iterating = True
        return (unpack(packed, device=self.device) for packed in super().__iter__())

    def state_dict(self) -> dict:
        if self.num_workers == 0 or not self._iterating:
            # Same process, or no workers yet: the dataset holds the position itself.
            return self.dataset.state_dict()
        state = super().state_dict()
        # torchdata 0.11 layout; with snapshot_every_n_steps=1 the snapshot is current.
        assert state["_steps_since_snapshot"] == 0, state["_steps_since_snapshot"]
        workers = state["_snapshot"]["_worker_snapshots"].values()
        return merge_worker_states([w["dataset_state"] for w in workers])

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        super().load_state_dict({})  # drops a running iterator; the next one starts at the state
        self._iterating = False

    def data_metrics(self, *, bad_samples: dict[str, int] | None = None) -> dict[str, float]:
        """``data/...`` metrics of this rank (see ``data_metrics``); cheap, no I/O.
        ``bad_samples``: per source over all ranks (``check_bad_samples``), logged instead of this rank's."""
        return data_metrics(
            self.state_dict(), targets=self.targets, source_tasks=self.source_tasks, bad_samples=bad_samples
        )

    def bad_sample_counts(self) -> torch.Tensor:
        """This rank's bad and read (bad + delivered) samples of each source, float64 [2, S]
        in config order, as of the batches handed out: to be summed over all ranks (an
        all-reduce) and passed to :meth:`check_bad_samples`. float64 counts exactly."""
        counts = source_counts(self.state_dict()).values()
        return torch.tensor([[c["bad"] for c in counts], [c["bad"] + c["samples"] for c in counts]],
                            dtype=torch.float64)

    def check_bad_samples(self, summed: torch.Tensor) -> dict[str, int]:
        """Bad samples per source from ``summed`` (:meth:`bad_sample_counts` summed over
        all ranks); raises :class:`TooManyBadSamples` when a source has more than
        ``data.max_bad_fraction`` bad (see ``bad_data.check_bad_fraction``). Given the
        same sums, every rank raises the same error or none does."""
        bad, read = (row.long().tolist() for row in summed.reshape(2, -1))
        names = list(self.dataset.layout["sources"])
        world_size = self.dataset.layout["world_size"]
        for name, source_bad, source_read in zip(names, bad, read):
            check_bad_fraction(
                name, bad=source_bad, read=source_read, max_bad_fraction=self.dataset.max_bad_fraction,
                min_samples=self.dataset.bad_fraction_min_samples, where=f"by all {world_size} rank(s)",
            )
        return dict(zip(names, bad))


def _log_small_source(plan: SourcePlan, *, world_size: int, readers_per_rank: int) -> None:
    """One line when a source has fewer samples than reader slots: how its epochs are dealt out."""
    slots = world_size * readers_per_rank
    if plan.num_samples >= slots:
        return
    log.info(
        "source %r has %d samples for %d reader slots (world_size %d x data.readers_per_rank %d): each epoch gives "
        "%d of the slots a sample, the others read in the next epochs; each sample still once per epoch",
        plan.name, plan.num_samples, slots, world_size, readers_per_rank, plan.num_samples,
    )


def load_label_space(cfg: DataConfig, tasks: list[TaskSpec] | None) -> tuple[LabelSpace, list[Manifest]]:
    """The label space of ``tasks`` (``model.tasks``; None: derived from the sources) over
    the configured sources, and their manifests restricted to the annotation types a task
    trains."""
    manifests = load_manifests(cfg)
    label_space = build_label_space(manifests, tasks, [s.tasks for s in cfg.sources])
    return label_space, restrict_to_tasks(manifests, label_space)


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, tasks: list[TaskSpec] | None = None,
                       device: torch.device | None = None) -> tuple[TrainLoader, LabelSpace, list[Manifest]]:
    """An endless loader of :class:`Batch` (``cfg.batch_size`` samples) for one rank, for
    the named ``tasks`` (``model.tasks``; None: one per annotation type of the sources).

    The stream builds whole batches (see ``stream.py``); the loader's ``state_dict()`` /
    ``load_state_dict()`` checkpoint its position and ``data_metrics()`` reports the mix.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    label_space, manifests = load_label_space(cfg, tasks)
    weights = strategy_weights(
        cfg.sampling,
        num_samples={m.name: m.num_samples for m in manifests},
        fixed={m.name: s.weight for m, s in zip(manifests, cfg.sources)} if cfg.sampling == "fixed" else None,
        temperature=cfg.temperature,
    )
    plans = [
        SourcePlan(
            name=m.name,
            urls=shard_urls(m, s, where=f"DataConfig.sources[{i}]"),
            shard_sizes=tuple(shard.num_samples for shard in m.shards),
            seed=cfg.seed,
            block_size=cfg.shuffle_buffer,
            open_shards=cfg.open_shards,
            full_shuffle=cfg.shuffle == "full",
        )
        for i, (m, s) in enumerate(zip(manifests, cfg.sources))
    ]
    for i, plan in enumerate(plans):
        if plan.num_samples == 0:
            where = f"DataConfig.sources[{i}].path"
            raise ValueError(f"{where}: source {plan.name!r} ({cfg.sources[i].path}) has no samples")
        if rank == 0:
            _log_small_source(plan, world_size=world_size, readers_per_rank=cfg.readers_per_rank)
    transform_cfgs = {m.name: s.transforms or cfg.transforms for m, s in zip(manifests, cfg.sources)}
    transforms = {name: build_train_transforms(t, flip_permutation=_flip_permutation(label_space, name))
                  for name, t in transform_cfgs.items()}
    sampler = TaskSampler(
        weights, strategy=cfg.sampling, composition=cfg.composition, batch_size=cfg.batch_size,
        seed=cfg.seed, readers_per_rank=cfg.readers_per_rank,
    )
    dataset = MixedSourceStream(
        plans,
        prepare=SamplePreparer(
            manifests, label_space=label_space, transforms=transforms, seed=cfg.seed,
            decode_sizes={name: t.decode_size() for name, t in transform_cfgs.items()},
        ),
        sampler=sampler,
        seed=cfg.seed,
        world_size=world_size,
        rank=rank,
        readers_per_rank=cfg.readers_per_rank,
        bad_sample_policy=cfg.bad_sample_policy,
        max_bad_fraction=cfg.max_bad_fraction,
        bad_fraction_min_samples=cfg.bad_fraction_min_samples,
    )
    loader = TrainLoader(
        dataset,
        num_workers=resolve_num_workers(cfg.num_workers, readers_per_rank=cfg.readers_per_rank, rank=rank),
        device=device,
        # Only for torch's worker seeding, which nothing here uses (augmentation is seeded
        # per sample); a generator of our own keeps the trainer's global RNG untouched.
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, rank, "torch")),
        targets=sampler.probabilities,
        source_tasks={m.name: label_space.fed_tasks(m.name) for m in manifests},
    )
    return loader, label_space, manifests


def _flip_permutation(label_space: LabelSpace, source: str) -> list[int] | None:
    """The left/right swap of the keypoint task ``source`` feeds (its keypoints are put in
    that task's unified schema), None without keypoints."""
    schema = label_space.keypoint_schema_of(source)
    return None if schema is None else schema.flip_permutation()
