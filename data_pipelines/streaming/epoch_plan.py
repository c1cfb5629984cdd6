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

A source with fewer samples than slots (``N < S``) would leave slots without a sample.
Such a source is dealt out ``P = ceil(S / N)`` epochs at a time instead (a *pass*): the
sequences of epochs ``e .. e + P - 1`` are concatenated, each epoch's samples in a seeded
random order (a share of a sample or two leaves nothing for shard order and blocks to
shuffle), and step 2 splits those ``P N >= S`` positions over the slots, so every slot
gets at least one and every epoch is still read exactly once over all slots. Sources with
``N >= S`` have ``P = 1``: a pass is one epoch, as above. ``P`` depends only on ``N`` and ``S``.

Everything is a pure function of (seed, source, epoch, num_slots, slot), so a reader's
position is two integers (the first epoch of its pass, number of samples emitted) and
resuming recomputes the rest; the block being emitted is the only data that is read again.
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


def epochs_per_pass(num_samples: int, num_slots: int) -> int:
    """Epochs dealt out together (``P`` above): 1, or for a source smaller than the slots the
    fewest whole epochs that give every slot a sample."""
    if num_samples < 1:
        raise ValueError(f"a source with {num_samples} samples cannot be read")
    return max(1, -(-num_slots // num_samples))


def share_bounds(num_samples: int, *, slot: int, num_slots: int) -> tuple[int, int]:
    """Slot ``slot``'s range ``[start, stop)`` of a pass's positions (step 2 above)."""
    total = num_samples * epochs_per_pass(num_samples, num_slots)
    return slot * total // num_slots, (slot + 1) * total // num_slots


def epoch_shard_order(plan: SourcePlan, epoch: int) -> list[int]:
    """Manifest shard indices in epoch ``epoch``'s seeded order (step 1 above)."""
    return permutation(len(plan.shard_sizes), seed=derive_seed(plan.seed, plan.name, "shards", epoch))


class EpochShare:
    """One slot's share of one pass of one source: of epoch ``epoch`` alone, or for a small
    source of epochs ``epoch .. epoch + num_epochs - 1`` (see the module docstring)."""

    def __init__(self, plan: SourcePlan, *, epoch: int, slot: int, num_slots: int) -> None:
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is not in [0, {num_slots})")
        self.plan = plan
        self.epoch = epoch
        self.slot = slot
        self.num_slots = num_slots
        self.num_epochs = epochs_per_pass(plan.num_samples, num_slots)
        self.start, self.stop = share_bounds(plan.num_samples, slot=slot, num_slots=num_slots)

    def __len__(self) -> int:
        return self.stop - self.start

    @cached_property
    def shard_order(self) -> list[int]:
        """Shard order of the pass's first epoch."""
        return epoch_shard_order(self.plan, self.epoch)

    @cached_property
    def _shard_starts(self) -> list[int]:
        # Epoch-sequence index of each shard's first sample, in epoch order (one-epoch passes).
        sizes = [self.plan.shard_sizes[k] for k in self.shard_order]
        return [0, *itertools.accumulate(sizes)]

    @cached_property
    def _small_share(self) -> list[tuple[int, int, int]]:
        """(epoch, manifest shard index, index inside the shard) of each share position, for
        passes of several epochs: fewer samples than slots, so cheap to list."""
        sequence = []
        for epoch in range(self.epoch, self.epoch + self.num_epochs):
            shards = epoch_shard_order(self.plan, epoch)
            samples = [(epoch, k, i) for k in shards for i in range(self.plan.shard_sizes[k])]
            order = permutation(len(samples), seed=derive_seed(self.plan.seed, self.plan.name, "samples", epoch))
            sequence += [samples[j] for j in order]
        return sequence[self.start : self.stop]

    def spans(self, first: int) -> list[ShardSpan]:
        """The shards holding share positions ``first ..`` to the end, in reading order."""
        if self.num_epochs > 1:
            return [ShardSpan(shard, index, index + 1) for _, shard, index in self._small_share[first:]]
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
        if self.num_epochs > 1:
            return self._small_share[position][1:]
        begin = self.start + position
        i = bisect.bisect_right(self._shard_starts, begin) - 1
        return self.shard_order[i], begin - self._shard_starts[i]

    def epoch_of(self, position: int) -> int:
        """The epoch share position ``position`` is read for (``epoch`` unless a pass spans several)."""
        return self._small_share[position][0] if self.num_epochs > 1 else self.epoch

    def block_bounds(self, block: int) -> tuple[int, int]:
        """Share positions ``[lo, hi)`` of block ``block``."""
        size = self.plan.block_size
        return block * size, min((block + 1) * size, len(self))

    def block_order(self, block: int) -> list[int]:
        """Emission order of block ``block``: share positions, a seeded permutation."""
        lo, hi = self.block_bounds(block)
        seed = derive_seed(self.plan.seed, self.plan.name, "block", self.epoch, self.num_slots, self.slot, block)
        return [lo + i for i in permutation(hi - lo, seed=seed)]
