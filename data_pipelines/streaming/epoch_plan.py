"""Which samples of a source a reader slot reads in each epoch, and in which order.

A source's samples are addressed by *position*: (shard index in the manifest, index of
the sample inside its tar), known from the manifest's per-shard counts without reading
anything. Every rank has ``readers_per_rank`` readers; reader ``l`` of rank ``r`` is
*slot* ``r * readers_per_rank + l`` of ``num_slots = world_size * readers_per_rank``.

Epoch ``e`` of a source, for a given seed:

1. the shards are put in a seeded random order (new every epoch), and their samples
   concatenated in that order: the epoch's sequence of ``N`` positions;
2. slot ``s`` gets the contiguous range ``[floor(s N / S), floor((s + 1) N / S))`` of
   it (``S = num_slots``): the ranges partition the epoch, their sizes differ by at
   most one sample, and a slot reads only the shards its range overlaps (at most two
   of them shared with a neighbour, read in part by each);
3. the range is cut into blocks of ``block_size`` consecutive positions (the shuffle
   buffer) and each block is emitted in a seeded random order (new every epoch).

Everything is a pure function of (seed, source, epoch, num_slots, slot), so a reader's
position is two integers (epoch, number of samples emitted) and resuming recomputes the
rest; the block being emitted is the only data that is read again.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property

from data_pipelines.streaming.seeding import derive_seed, permutation


@dataclass(frozen=True, kw_only=True)
class SourcePlan:
    """What the plan needs to know about one source."""

    name: str
    urls: tuple[str, ...]  # one per shard, manifest order
    shard_sizes: tuple[int, ...]  # samples per shard, manifest order
    seed: int
    block_size: int  # shuffle buffer, in samples

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)


@dataclass(frozen=True)
class ShardSpan:
    """Samples ``[start, stop)`` (indices inside the tar) of manifest shard ``shard``."""

    shard: int
    start: int
    stop: int


class EpochShare:
    """One slot's share of one epoch of one source."""

    def __init__(self, plan: SourcePlan, *, epoch: int, slot: int, num_slots: int) -> None:
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is not in [0, {num_slots})")
        self.plan = plan
        self.epoch = epoch
        self.slot = slot
        self.num_slots = num_slots
        n = plan.num_samples
        self.start = slot * n // num_slots
        self.stop = (slot + 1) * n // num_slots

    def __len__(self) -> int:
        return self.stop - self.start

    @cached_property
    def shard_order(self) -> list[int]:
        seed = derive_seed(self.plan.seed, self.plan.name, "shards", self.epoch)
        return permutation(len(self.plan.shard_sizes), seed=seed)

    @cached_property
    def _shard_starts(self) -> list[int]:
        # Epoch-sequence index of each shard's first sample, in epoch order.
        sizes = [self.plan.shard_sizes[k] for k in self.shard_order]
        return [0, *itertools.accumulate(sizes)]

    def spans(self, first: int) -> list[ShardSpan]:
        """The shards holding share positions ``first ..`` to the end, in reading order."""
        begin, end = self.start + first, self.stop
        spans = []
        i = bisect.bisect_right(self._shard_starts, begin) - 1
        while begin < end:
            shard_begin = self._shard_starts[i]
            shard_end = self._shard_starts[i + 1]
            if shard_end > begin:  # empty shards hold nothing
                spans.append(ShardSpan(self.shard_order[i], begin - shard_begin, min(end, shard_end) - shard_begin))
                begin = min(end, shard_end)
            i += 1
        return spans

    def locate(self, position: int) -> tuple[int, int]:
        """(manifest shard index, index inside the shard) of share position ``position``."""
        begin = self.start + position
        i = bisect.bisect_right(self._shard_starts, begin) - 1
        return self.shard_order[i], begin - self._shard_starts[i]

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Share positions ``[lo, hi)`` of block ``block``."""
        size = self.plan.block_size
        return block * size, min((block + 1) * size, len(self))

    def block_order(self, block: int) -> list[int]:
        """Emission order of block ``block``: share positions, a seeded permutation."""
        lo, hi = self.block_bounds(block)
        seed = derive_seed(self.plan.seed, self.plan.name, "block", self.epoch, self.num_slots, self.slot, block)
        return [lo + i for i in permutation(hi - lo, seed=seed)]
