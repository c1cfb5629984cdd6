"""The ``data`` section of the job config: sources, sampling, shuffling, transforms.

Torch-free, as every config module is: ``polytask launch`` validates a config and reports
its errors before anything imports torch (tests/launcher/test_cli_imports.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_pipelines.bad_data import check_policy
from data_pipelines.streaming.task_sampler import COMPOSITIONS, STRATEGIES


RESIZES = ("square", "short_side")  # TransformConfig.resize

# Detectron2 / MMDetection's 800 x <=1333: the default long-side cap is image_size in that ratio.
DEFAULT_MAX_SIZE_RATIO = 1333 / 800


@dataclass(kw_only=True)
class TransformConfig:
    # "square": every image becomes image_size x image_size (aspect ratio ignored), so
    # batches stack as they are. "short_side": one factor per image, shorter side to
    # s * image_size and longer side at most s * max_size (Detectron2's ResizeShortestEdge);
    # collate pads each batch to its largest image (bottom/right).
    resize: str = "square"
    image_size: int = 128
    # short_side only: the cap on the longer side; None = round(image_size * 1333 / 800).
    max_size: int | None = None
    hflip_prob: float = 0.5
    # Scale jitter, s uniform in scale_range. square: the image is resized to
    # (s * image_size)^2, then randomly cropped (s > 1) or padded (s < 1) back to
    # image_size^2; boxes leaving the crop are clipped (dropped once empty), keypoints
    # leaving it are marked unlabelled. short_side: s scales both image_size and max_size
    # (multi-scale training), no crop or pad. (1, 1) is a plain resize, as evaluation does.
    scale_range: tuple[float, float] = (1.0, 1.0)
    # Colour jitter (torchvision ColorJitter factors); 0 = off. Images only.
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    # Decode JPEGs at 1/2, 1/4 or 1/8 of their size (libjpeg DCT scaling) when that still
    # leaves decode_size() pixels on both sides; annotations follow (see decode.py).
    # False decodes every pixel.
    reduced_decode: bool = True

    def decode_size(self) -> int | None:
        """The side every decoded image must keep, on both axes: the largest the
        transforms resize to (scale jitter included). None: decode at full size.

        short_side: the shorter side is resized to at most this (less when max_size
        caps the longer side), and a decode that keeps the shorter side at least this
        keeps the longer side at least its target too (one factor for both)."""
        if not self.reduced_decode:
            return None
        return math.ceil(self.image_size * self.scale_range[1])

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ValueError(f"TransformConfig.resize must be one of {list(RESIZES)}, got {self.resize!r}")
        if self.image_size < 1:
            raise ValueError(f"TransformConfig.image_size must be >= 1, got {self.image_size}")
        if self.resize == "square" and self.max_size is not None:
            raise ValueError(
                f"TransformConfig.max_size is only used with resize='short_side' (resize is 'square'), got {self.max_size}"
            )
        if self.resize == "short_side":
            if self.max_size is None:
                self.max_size = round(self.image_size * DEFAULT_MAX_SIZE_RATIO)
            if self.max_size < self.image_size:
                raise ValueError(
                    f"TransformConfig.max_size must be >= image_size ({self.image_size}), got {self.max_size}"
                )
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"TransformConfig.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        self.scale_range = tuple(self.scale_range)
        if len(self.scale_range) != 2 or not 0.0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"TransformConfig.scale_range must be [low, high] with 0 < low <= high, got {self.scale_range}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"TransformConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"TransformConfig.hue must be in [0, 0.5], got {self.hue}")


SHUFFLES = ("stream", "full")  # DataConfig.shuffle


@dataclass(kw_only=True)
class SourceConfig:
    path: str  # a converted source directory holding manifest.json
    weight: float | None = None  # only with sampling="fixed"
    # Where to read the shards from instead of the manifest's paths, e.g.
    # "pipe:aws s3 cp s3://bucket/coco/coco-{000000..000999}.tar -": a webdataset URL,
    # brace-expanded to exactly the manifest's shards, in manifest order.
    shards: str | None = None
    transforms: TransformConfig | None = None  # this source's own; default: DataConfig.transforms
    # Annotation type -> the task (model.tasks name) it trains, e.g. {detection: driving};
    # unmapped types go to the task named after the type, else the only task of the type
    # (data_pipelines/tasks.py).
    tasks: dict[str, str] | None = None


@dataclass(kw_only=True)
class DataConfig:
    sources: list[SourceConfig]
    sampling: str = "proportional"  # one of task_sampler.STRATEGIES
    composition: str = "mixed"  # one of task_sampler.COMPOSITIONS: mixed per sample, or homogeneous batches
    temperature: float = 2.0  # sampling="temperature": p ∝ n^(1/temperature)
    batch_size: int = 2  # per rank
    # Must divide readers_per_rank (or be 0). "auto": this node's cores shared by its local
    # ranks, one kept for each main process, as a divisor (workers.py; logged by every rank).
    num_workers: int | str = 1
    # Shard readers per rank (see epoch_plan). With seed and world size it fixes the
    # sample sequence; num_workers does not, so it may change between runs.
    readers_per_rank: int = 4
    seed: int = 0
    # Samples per shuffled block, per reader and source (see epoch_plan). Measured with
    # bench/shuffle_quality.py (class-sorted 20k-sample source, 1000-sample shards, 2 ranks x
    # 4 readers, batch 8; distinct classes per 4 batches, uniform permutation 9.66): with
    # open_shards 4, buffers of 64 / 256 / 1024 / 4096 give 8.97 / 8.91 / 9.01 / 9.21, so
    # the buffer barely matters once several shards are open, while its memory (up to a
    # block of raw samples per reader and source) and the reading before a (resumed) first
    # batch grow with it: 64.
    shuffle_buffer: int = 64
    # Shards each reader reads at once per source, from that many places spread over the
    # epoch, interleaved: a slot's samples come from all over the source, reads stay
    # sequential (same run: open_shards 1 / 4 / 8 give 3.84 / 8.97 / 9.00 at buffer 64).
    open_shards: int = 4
    # "stream": sequential reads as above; "full": one random permutation of every epoch,
    # each sample read on its own (local disks or other random-access storage only).
    shuffle: str = "stream"
    bad_sample_policy: str = "skip"  # raise | skip (drop, count, log)
    max_bad_fraction: float = 0.01  # skip: fail when more of a source (over all ranks) is bad
    # skip: max_bad_fraction is judged against at least this many samples read of the
    # source, so that a few bad samples early on (or in a small source) are not a high rate.
    bad_fraction_min_samples: int = 1000
    audit: bool = False  # write <run.dir>/audit/rank_<r>.jsonl: sample keys per step
    transforms: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("DataConfig.sources must list at least one source")
        if self.sampling not in STRATEGIES:
            raise ValueError(f"DataConfig.sampling must be one of {list(STRATEGIES)}, got {self.sampling!r}")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"DataConfig.composition must be one of {list(COMPOSITIONS)}, got {self.composition!r}")
        for i, source in enumerate(self.sources):
            if self.sampling == "fixed" and (source.weight is None or not source.weight > 0):
                raise ValueError(
                    f"DataConfig.sources[{i}].weight must be > 0 with sampling='fixed', got {source.weight}"
                )
            if self.sampling != "fixed" and source.weight is not None:
                raise ValueError(
                    f"DataConfig.sources[{i}].weight is only used with sampling='fixed' (sampling is {self.sampling!r})"
                )
            # Batches mix sources and stack (square) or pad (short_side) their images.
            for name in ("resize", "image_size"):
                if source.transforms is not None and getattr(source.transforms, name) != getattr(self.transforms, name):
                    raise ValueError(
                        f"DataConfig.sources[{i}].transforms.{name} must equal transforms.{name} "
                        f"({getattr(self.transforms, name)!r}), got {getattr(source.transforms, name)!r}"
                    )
        if not self.temperature > 0:
            raise ValueError(f"DataConfig.temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.num_workers, str) and self.num_workers != "auto":
            raise ValueError(f"DataConfig.num_workers must be an integer >= 0 or 'auto', got {self.num_workers!r}")
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.readers_per_rank < 1:
            raise ValueError(f"DataConfig.readers_per_rank must be >= 1, got {self.readers_per_rank}")
        if isinstance(self.num_workers, int) and self.num_workers and self.readers_per_rank % self.num_workers:
            raise ValueError(
                f"DataConfig.num_workers ({self.num_workers}) must divide readers_per_rank "
                f"({self.readers_per_rank}): each reader's batches go to one worker"
            )
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.open_shards < 1:
            raise ValueError(f"DataConfig.open_shards must be >= 1, got {self.open_shards}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"DataConfig.shuffle must be one of {list(SHUFFLES)}, got {self.shuffle!r}")
        check_policy(self.bad_sample_policy, self.max_bad_fraction, where="DataConfig")
        if self.bad_fraction_min_samples < 0:
            raise ValueError(f"DataConfig.bad_fraction_min_samples must be >= 0, got {self.bad_fraction_min_samples}")
