"""One reader slot's endless stream of one source: its share of epoch 0, then of
epoch 1, ... (see ``epoch_plan``; a source smaller than the slots: of passes of several
epochs), each share's blocks emitted in their shuffled order; after a world-size change,
first what the old layout's slots left of earlier epochs.

The position is (first epoch of the pass, samples of the pass's share emitted). Resuming
reopens the shard holding the first sample of the current block and reads forward from
there, keeping only the block's samples not yet emitted: nothing before the block is read
again, and the reader never has more than one block of raw samples in memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from data_pipelines.streaming.epoch_plan import EpochShare, SourcePlan
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
    """The rest of one slot's share of one pass under an earlier layout of slots, from
    ``position`` on: what a world-size change hands to a new slot to finish."""

    epoch: int  # the pass's first epoch
    num_slots: int
    slot: int
    position: int


class SourceReader:
    """Endless iterator of :class:`SourceItem`: first the ``pending`` segments, then the
    slot's own share of the pass starting at ``epoch``, then of the next pass, ...
    ``epoch``/``position``/``pending`` always name the next item to emit."""

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
        share = EpochShare(plan, epoch=epoch, slot=slot, num_slots=num_slots)
        assert len(share) > 0, (plan.name, slot, num_slots)  # epochs_per_pass gives every slot a sample
        if not 0 <= position <= len(share):
            raise ValueError(f"source {plan.name!r}: position {position} is outside slot {slot}'s share of {len(share)}")
        self.plan = plan
        self.slot = slot
        self.num_slots = num_slots
        self.share_size = len(share)  # the same every pass
        # A state taken right after a share's last item names the next pass's start.
        self.epoch, self.position = (epoch + share.num_epochs, 0) if position == len(share) else (epoch, position)
        self.pending = [seg for seg in pending or [] if seg.position < len(self._share(seg))]
        self._items: Iterator[SourceItem] | None = None

    def __next__(self) -> SourceItem:
        if self._items is None:
            self._items = self._generate()
        return next(self._items)

    def __iter__(self) -> Iterator[SourceItem]:
        return self

    def _share(self, seg: Segment) -> EpochShare:
        return EpochShare(self.plan, epoch=seg.epoch, slot=seg.slot, num_slots=seg.num_slots)

    def _generate(self) -> Iterator[SourceItem]:
        while self.pending:
            seg = self.pending[0]
            share = self._share(seg)
            for item, emitted in self._emit_share(share, first=seg.position):
                # Advance first, then yield: a state taken while the item is out names the next one.
                if emitted == len(share):
                    self.pending.pop(0)
                else:
                    self.pending[0] = Segment(seg.epoch, seg.num_slots, seg.slot, emitted)
                yield item
        while True:
            share = EpochShare(self.plan, epoch=self.epoch, slot=self.slot, num_slots=self.num_slots)
            for item, emitted in self._emit_share(share, first=self.position):
                self.position = emitted
                yield item
            self.epoch, self.position = self.epoch + share.num_epochs, 0

    def _emit_share(self, share: EpochShare, *, first: int) -> Iterator[tuple[SourceItem, int]]:
        """The share's items from position ``first`` on, each with the count emitted after it."""
        size = self.plan.block_size
        block = first // size
        # Reading starts at the current block's first sample and then runs on through
        # the share: each later block continues where the previous one stopped.
        next_read = block * size
        payloads = read_spans(self.plan.urls, share.spans(next_read), sizes=self.plan.shard_sizes)
        while block * size < len(share):
            lo, _ = share.block_bounds(block)
            done = max(first - lo, 0)  # emitted from this block before a resume
            order = share.block_order(block)[done:]
            wanted = set(order)
            held: dict[int, dict | ReadFailure] = {}
            for i, pos in enumerate(order):
                while pos not in held:
                    payload = next(payloads)
                    if next_read in wanted:  # samples emitted before a resume are skipped unread
                        held[next_read] = payload
                    next_read += 1
                shard, index = share.locate(pos)
                yield SourceItem(held.pop(pos), share.epoch_of(pos), shard, index), lo + done + i + 1
            block += 1
