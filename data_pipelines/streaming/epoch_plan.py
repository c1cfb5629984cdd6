"""Which samples of a source a reader slot reads in each epoch, and in which order.

A source's samples are addressed by *position*: (shard index in the manifest, index of
the sample inside its tar), known from the manifest's per-shard counts without reading
anything. Every rank has ``readers_per_rank`` readers; reader ``l`` of rank ``r`` is
*slot* ``r * readers_per_rank + l`` of ``S = world_size * readers_per_rank``.

Epoch ``e`` of a source of ``N`` samples, for a given seed:

1. the shards are put in a seeded random order (new every epoch) and their samples
   concatenated in that order: the epoch's sequence of ``N`` positions;
2. the sequence is rotated by a seeded offset (new every epoch, so that a slot's place in
   the stripes does not line up with shard boundaries epoch after epoch), cut into
   ``open_shards`` equal *stripes*, and its positions renumbered stripe-interleaved (the
   first sample of every stripe, then the second of every stripe, ...): the epoch's
   *virtual order*;
3. slot ``s`` gets a contiguous range of the virtual order, of ``n_s(e) =
   floor(((e+1) N + s) / S) - floor((e N + s) / S)`` samples (``floor`` or ``ceil`` of
   ``N / S``; the slots taking the extra sample rotate from epoch to epoch, so after any
   number of epochs the slots' totals differ by at most one). In each stripe that range is
   contiguous, so a slot reads ``open_shards`` shards at a time, sequentially, from
   ``open_shards`` places spread over the whole epoch;
4. the range is cut into blocks of ``block_size`` consecutive positions (the shuffle
   buffer) and each block is emitted in a seeded random order (new every epoch).

With ``full_shuffle`` (storage with random access), step 1-2 are one seeded permutation of
all ``N`` positions instead, and every sample is read on its own (a tar opened and its
member headers skipped to the sample, per sample).

A source with fewer samples than slots leaves some slots without a sample in an epoch; they
read in the next epoch that gives them one. Sampling keeps the slots' per-source counts
together (``task_sampler``), so all slots finish an epoch of a source together: no sample
is read a second time before every sample of its source has been read once (up to one
sample per slot at the epoch boundary).

Everything is a pure function of (seed, source, epoch, num_slots, slot), so a reader's
position is two integers (epoch, samples of its share emitted) and resuming recomputes the
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
    open_shards: int = 1  # stripes read at once per slot (step 2 above)
    full_shuffle: bool = False  # one permutation of all samples, read with random access

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)


@dataclass(frozen=True)
class ShardSpan:
    """Samples ``[start, stop)`` (indices inside the tar) of manifest shard ``shard``."""

    shard: int
    start: int
    stop: int


def _prefix(total: int, slot: int, num_slots: int) -> int:
    """``sum_{j < slot} floor((total + j) / num_slots)`` in closed form."""
    q, r = divmod(total, num_slots)
    return q * slot + max(0, slot - num_slots + r)


def share_bounds(num_samples: int, *, epoch: int, slot: int, num_slots: int) -> tuple[int, int]:
    """Slot ``slot``'s range ``[start, stop)`` of epoch ``epoch``'s virtual order (step 3)."""
    if num_samples < 1:
        raise ValueError(f"a source with {num_samples} samples cannot be read")

    def start(s: int) -> int:
        return _prefix((epoch + 1) * num_samples, s, num_slots) - _prefix(epoch * num_samples, s, num_slots)

    return start(slot), start(slot + 1)


def samples_through(num_samples: int, *, epoch: int, slot: int, num_slots: int) -> int:
    """Samples slot ``slot`` reads in epochs ``0 .. epoch`` together."""
    return ((epoch + 1) * num_samples + slot) // num_slots


def epoch_shard_order(plan: SourcePlan, epoch: int) -> list[int]:
    """Manifest shard indices in epoch ``epoch``'s seeded order (step 1 above)."""
    return permutation(len(plan.shard_sizes), seed=derive_seed(plan.seed, plan.name, "shards", epoch))


class EpochShare:
    """One slot's share of one epoch of one source (see the module docstring)."""

    def __init__(self, plan: SourcePlan, *, epoch: int, slot: int, num_slots: int) -> None:
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is not in [0, {num_slots})")
        self.plan = plan
        self.epoch = epoch
        self.slot = slot
        self.num_slots = num_slots
        self.start, self.stop = share_bounds(plan.num_samples, epoch=epoch, slot=slot, num_slots=num_slots)
        n = plan.num_samples
        self._stripe_len = -(-n // max(1, min(plan.open_shards, n)))
        self._stripes = -(-n // self._stripe_len)
        self._last_len = n - (self._stripes - 1) * self._stripe_len
        self._rotation = derive_seed(plan.seed, plan.name, "rotation", epoch) % n

    def __len__(self) -> int:
        return self.stop - self.start

    @cached_property
    def shard_order(self) -> list[int]:
        return epoch_shard_order(self.plan, self.epoch)

    @cached_property
    def _shard_starts(self) -> list[int]:
        # Epoch-sequence index of each shard's first sample, in epoch order.
        sizes = [self.plan.shard_sizes[k] for k in self.shard_order]
        return [0, *itertools.accumulate(sizes)]

    @cached_property
    def _full_order(self) -> list[int]:
        """full_shuffle: the epoch's permutation of sequence indices (manifest shard order)."""
        seed = derive_seed(self.plan.seed, self.plan.name, "full", self.epoch)
        return permutation(self.plan.num_samples, seed=seed)

    # --- virtual order (step 2) -------------------------------------------------------
    def _virtual(self, offset: int, stripe: int) -> int:
        """Virtual index of sample ``offset`` of stripe ``stripe``."""
        k, cut = self._stripes, self._last_len * self._stripes
        if offset < self._last_len:
            return offset * k + stripe
        return cut + (offset - self._last_len) * (k - 1) + stripe

    def _stripe_offset(self, virtual: int) -> tuple[int, int]:
        """(stripe, offset in it) of a virtual index; the inverse of :meth:`_virtual`."""
        k, cut = self._stripes, self._last_len * self._stripes
        if virtual < cut:
            offset, stripe = divmod(virtual, k)
            return stripe, offset
        offset, stripe = divmod(virtual - cut, k - 1)
        return stripe, self._last_len + offset

    def _sequence_index(self, position: int) -> int:
        """Epoch-sequence index (step 1) of share position ``position``."""
        stripe, offset = self._stripe_offset(self.start + position)
        return (stripe * self._stripe_len + offset + self._rotation) % self.plan.num_samples

    def _locate_sequence(self, index: int) -> tuple[int, int]:
        if self.plan.full_shuffle:
            index = self._full_order[index]
            starts = self._manifest_starts
            i = bisect.bisect_right(starts, index) - 1
            return i, index - starts[i]
        i = bisect.bisect_right(self._shard_starts, index) - 1
        return self.shard_order[i], index - self._shard_starts[i]

    @cached_property
    def _manifest_starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.plan.shard_sizes)]

    def locate(self, position: int) -> tuple[int, int]:
        """(manifest shard index, index inside the shard) of share position ``position``."""
        return self._locate_sequence(self._sequence_index(position))

    def stripe_of(self, position: int) -> int:
        """The stream (stripe; 0 for full_shuffle) share position ``position`` is read from."""
        return 0 if self.plan.full_shuffle else self._stripe_offset(self.start + position)[0]

    def streams(self, first: int) -> dict[int, list[ShardSpan]]:
        """Per stream, the shard spans holding share positions ``first ..`` to the end that
        it reads, in reading order; reading every stream in step with
        :meth:`stripe_of` yields the share positions in order."""
        if first >= len(self):
            return {}
        if self.plan.full_shuffle:
            spans = [ShardSpan(s, i, i + 1) for s, i in map(self.locate, range(first, len(self)))]
            return {0: spans}
        out = {}
        lo_v, hi_v = self.start + first, self.stop
        for stripe in range(self._stripes):
            length = self._stripe_len if stripe < self._stripes - 1 else self._last_len
            lo = bisect.bisect_left(range(length), lo_v, key=lambda o: self._virtual(o, stripe))
            hi = bisect.bisect_left(range(length), hi_v, key=lambda o: self._virtual(o, stripe))
            if hi > lo:
                n = self.plan.num_samples
                begin = (stripe * self._stripe_len + lo + self._rotation) % n
                end = begin + hi - lo
                out[stripe] = self._spans(begin, min(end, n)) + self._spans(0, max(end - n, 0))
        return out

    def _spans(self, begin: int, end: int) -> list[ShardSpan]:
        """Spans of epoch-sequence indices ``[begin, end)``, in order."""
        spans = []
        i = bisect.bisect_right(self._shard_starts, begin) - 1
        while begin < end:
            shard_begin, shard_end = self._shard_starts[i], self._shard_starts[i + 1]
            if shard_end > begin:  # empty shards hold nothing
                spans.append(ShardSpan(self.shard_order[i], begin - shard_begin, min(end, shard_end) - shard_begin))
                begin = min(end, shard_end)
            i += 1
        return spans

    # --- blocks (step 4) --------------------------------------------------------------
    def block_bounds(self, block: int) -> tuple[int, int]:
        """Share positions ``[lo, hi)`` of block ``block``."""
        size = self.plan.block_size
        return block * size, min((block + 1) * size, len(self))

    def block_order(self, block: int) -> list[int]:
        """Emission order of block ``block``: share positions, a seeded permutation."""
        lo, hi = self.block_bounds(block)
        seed = derive_seed(self.plan.seed, self.plan.name, "block", self.epoch, self.num_slots, self.slot, block)
        return [lo + i for i in permutation(hi - lo, seed=seed)]

    def emission_order(self) -> list[int]:
        """Every share position in emission order (blocks one after another)."""
        size = self.plan.block_size
        return [p for b in range(-(-len(self) // size)) for p in self.block_order(b)]


def next_epoch_with_samples(plan: SourcePlan, *, epoch: int, slot: int, num_slots: int) -> int:
    """The first epoch ``>= epoch`` that gives slot ``slot`` a sample (every epoch unless
    the source has fewer samples than slots)."""
    n = plan.num_samples
    while samples_through(n, epoch=epoch, slot=slot, num_slots=num_slots) == samples_through(
        n, epoch=epoch - 1, slot=slot, num_slots=num_slots
    ):
        epoch += 1
    return epoch
