"""One reader slot's endless stream of one source: its share of epoch 0, then of
epoch 1, ... (see ``epoch_plan``), each share's blocks emitted in their shuffled order;
after a world-size change, first the pieces of the old layout's shares it was dealt.

The position is (epoch, samples of the epoch's share emitted). Resuming reopens, in each
stripe, the shard holding the first sample of the current block and reads forward from
there, keeping only the block's samples not yet emitted: nothing before the block is read
again, and the reader never has more than one block of raw samples in memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from data_pipelines.streaming.epoch_plan import EpochShare, SourcePlan, next_epoch_with_samples
from data_pipelines.streaming.shard_reader import ReadFailure, read_spans


@dataclass(frozen=True)
class SourceItem:
    """One emitted position: the raw sample, or why it could not be read."""

    payload: dict | ReadFailure
    epoch: int  # the epoch of the source it is read for
    shard: int  # manifest index of the shard holding it
    index: int  # index of the sample inside its shard


@dataclass(frozen=True)
class Segment:
    """Emitted items ``[position, stop)`` of one slot's share of one epoch under an earlier
    layout of slots: what a world-size change hands to a new slot to finish."""

    epoch: int
    num_slots: int
    slot: int
    position: int
    stop: int


class SourceReader:
    """Endless iterator of :class:`SourceItem`: first the ``pending`` segments, then the
    slot's own share of epoch ``epoch`` from ``position``, then of the next epoch that
    gives the slot a sample, ... ``epoch``/``position``/``pending`` always name the next
    item to emit."""

    def __init__(
        self,
        plan: SourcePlan,
        *,
        slot: int,
        num_slots: int,
        epoch: int = 0,
        position: int = 0,
        pending: list[Segment] | None = None,
    ) -> None:
        self.plan = plan
        self.slot = slot
        self.num_slots = num_slots
        epoch = next_epoch_with_samples(plan, epoch=epoch, slot=slot, num_slots=num_slots) if position == 0 else epoch
        share = self._own(epoch)
        if not 0 <= position <= len(share):
            raise ValueError(
                f"source {plan.name!r}: position {position} is outside slot {slot}'s share of {len(share)}"
            )
        # A state taken right after a share's last item names the next epoch's start.
        self.epoch, self.position = (self._next_epoch(epoch), 0) if position == len(share) else (epoch, position)
        self.pending = [seg for seg in pending or [] if seg.position < seg.stop]
        self._items: Iterator[SourceItem] | None = None

    @property
    def share_size(self) -> int:
        """The most samples the slot reads of one epoch (shares differ by at most one)."""
        return max(1, -(-self.plan.num_samples // self.num_slots))

    def __next__(self) -> SourceItem:
        if self._items is None:
            self._items = self._generate()
        return next(self._items)

    def __iter__(self) -> Iterator[SourceItem]:
        return self

    def _own(self, epoch: int) -> EpochShare:
        return EpochShare(self.plan, epoch=epoch, slot=self.slot, num_slots=self.num_slots)

    def _next_epoch(self, epoch: int) -> int:
        return next_epoch_with_samples(self.plan, epoch=epoch + 1, slot=self.slot, num_slots=self.num_slots)

    def _generate(self) -> Iterator[SourceItem]:
        while self.pending:
            seg = self.pending[0]
            share = EpochShare(self.plan, epoch=seg.epoch, slot=seg.slot, num_slots=seg.num_slots)
            for item, emitted in emit_share(share, first=seg.position, stop=seg.stop):
                # Advance first, then yield: a state taken while the item is out names the next one.
                if emitted == seg.stop:
                    self.pending.pop(0)
                else:
                    self.pending[0] = Segment(seg.epoch, seg.num_slots, seg.slot, emitted, seg.stop)
                yield item
        while True:
            share = self._own(self.epoch)
            for item, emitted in emit_share(share, first=self.position, stop=len(share)):
                if emitted == len(share):
                    self.epoch, self.position = self._next_epoch(self.epoch), 0
                else:
                    self.position = emitted
                yield item


def emit_share(share: EpochShare, *, first: int, stop: int) -> Iterator[tuple[SourceItem, int]]:
    """The share's items ``first .. stop - 1`` in emission order, each with the count emitted
    after it."""
    size = share.plan.block_size
    block = first // size
    # Reading starts at the current block's first sample and then runs on through the
    # share: each later block continues where the previous one stopped, in every stream.
    next_read = block * size
    streams = {
        stripe: read_spans(share.plan.urls, spans, sizes=share.plan.shard_sizes)
        for stripe, spans in share.streams(next_read).items()
    }
    emitted = first
    while emitted < stop:
        lo, _ = share.block_bounds(block)
        order = share.block_order(block)[emitted - lo :]
        order = order[: stop - emitted]
        wanted = set(order)
        held: dict[int, dict | ReadFailure] = {}
        for pos in order:
            while pos not in held:
                payload = next(streams[share.stripe_of(next_read)])
                if next_read in wanted:  # samples emitted before a resume are dropped
                    held[next_read] = payload
                next_read += 1
            shard, index = share.locate(pos)
            emitted += 1
            yield SourceItem(held.pop(pos), share.epoch, shard, index), emitted
        block += 1
