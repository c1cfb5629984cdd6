"""Data config and the per-rank training loader the trainer pulls one batch per step from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.collate import collate
from data_pipelines.label_space import LabelSpace, build_label_space
from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.stream import MixedSourceStream, derive_seed
from data_pipelines.task_sampler import STRATEGIES, strategy_weights
from data_pipelines.transforms import TransformConfig, build_train_transforms


@dataclass(kw_only=True)
class SourceConfig:
    path: str  # a converted source directory holding manifest.json
    weight: float | None = None  # only with sampling="fixed"


@dataclass(kw_only=True)
class DataConfig:
    sources: list[SourceConfig]
    sampling: str = "proportional"  # one of task_sampler.STRATEGIES
    temperature: float = 2.0  # sampling="temperature": p ∝ n^(1/temperature)
    batch_size: int = 2  # per rank
    num_workers: int = 1
    seed: int = 0
    shuffle_buffer: int = 64  # raw samples per source per worker
    transforms: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("DataConfig.sources must list at least one source")
        if self.sampling not in STRATEGIES:
            raise ValueError(f"DataConfig.sampling must be one of {list(STRATEGIES)}, got {self.sampling!r}")
        for i, source in enumerate(self.sources):
            if self.sampling == "fixed" and (source.weight is None or not source.weight > 0):
                raise ValueError(
                    f"DataConfig.sources[{i}].weight must be > 0 with sampling='fixed', got {source.weight}"
                )
            if self.sampling != "fixed" and source.weight is not None:
                raise ValueError(
                    f"DataConfig.sources[{i}].weight is only used with sampling='fixed' (sampling is {self.sampling!r})"
                )
        if not self.temperature > 0:
            raise ValueError(f"DataConfig.temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


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


def build_train_loader(
    cfg: DataConfig, *, rank: int, world_size: int
) -> tuple[StatefulDataLoader, LabelSpace, list[Manifest]]:
    """An infinite loader of :class:`Batch` (``cfg.batch_size`` samples) for one rank.

    Batching happens in the DataLoader (``batch_size`` + ``collate``), so each batch comes
    whole from one worker and mixes sources sample by sample.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    manifests = load_manifests(cfg)
    label_space = build_label_space(manifests)
    weights = strategy_weights(
        cfg.sampling,
        num_samples={m.name: m.num_samples for m in manifests},
        fixed={m.name: s.weight for m, s in zip(manifests, cfg.sources)} if cfg.sampling == "fixed" else None,
        temperature=cfg.temperature,
    )
    flip_permutation = label_space.keypoints.flip_permutation() if label_space.keypoints else None
    dataset = MixedSourceStream(
        manifests,
        label_space=label_space,
        weights=weights,
        transform=build_train_transforms(cfg.transforms, flip_permutation=flip_permutation),
        seed=cfg.seed,
        rank=rank,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    loader = StatefulDataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=cfg.num_workers > 0,
        # Seeds each worker's torch RNG (augmentations) per (seed, rank). With num_workers=0
        # augmentations draw from the main process's RNG, which the trainer seeds.
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, rank, "torch")),
    )
    return loader, label_space, manifests
