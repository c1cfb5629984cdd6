from collections import Counter

import pytest

from data_pipelines.streaming.epoch_plan import EpochShare, SourcePlan, samples_through

# Uneven shards, one of them empty: shares must still partition every epoch.
SIZES = (5, 0, 3, 7, 1, 6)
N = sum(SIZES)


def plan(seed: int = 0, block_size: int = 4, open_shards: int = 1, full_shuffle: bool = False) -> SourcePlan:
    urls = tuple(f"s-{i}.tar" for i in range(len(SIZES)))
    return SourcePlan(name="s", urls=urls, shard_sizes=SIZES, seed=seed, block_size=block_size,
                      open_shards=open_shards, full_shuffle=full_shuffle)


def share_positions(share: EpochShare) -> list[tuple[int, int]]:
    return [share.locate(p) for p in range(len(share))]


def read_in_step(share: EpochShare, first: int) -> list[tuple[int, int]]:
    """What reading the share's streams in step with ``stripe_of`` yields, from ``first``."""
    streams = {k: iter([(s.shard, i) for s in spans for i in range(s.start, s.stop)])
               for k, spans in share.streams(first).items()}
    return [next(streams[share.stripe_of(p)]) for p in range(first, len(share))]


@pytest.mark.parametrize("open_shards, full", [(1, False), (3, False), (4, False), (1, True)])
@pytest.mark.parametrize("num_slots", [1, 3, 4, 7, N, N + 5])
def test_slot_shares_partition_every_epoch_and_slot_totals_stay_within_one(num_slots, open_shards, full):
    everything = Counter((shard, i) for shard, size in enumerate(SIZES) for i in range(size))
    totals = [0] * num_slots
    for epoch in range(4):
        shares = [EpochShare(plan(open_shards=open_shards, full_shuffle=full), epoch=epoch, slot=s,
                             num_slots=num_slots) for s in range(num_slots)]
        seen = Counter(pos for share in shares for pos in share_positions(share))
        assert seen == everything
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        # Issue 18: the slots taking the extra sample rotate, so totals never drift apart.
        totals = [t + len(share) for t, share in zip(totals, shares)]
        assert max(totals) - min(totals) <= 1
        assert totals == [samples_through(N, epoch=epoch, slot=s, num_slots=num_slots) for s in range(num_slots)]


@pytest.mark.parametrize("open_shards", [1, 3, 4])
def test_streams_read_in_step_are_the_share_in_order_and_each_stream_is_sequential(open_shards):
    for slot in range(4):
        share = EpochShare(plan(open_shards=open_shards), epoch=1, slot=slot, num_slots=4)
        streams = share.streams(0)
        assert len(streams) <= open_shards
        for spans in streams.values():
            assert all(s.stop > s.start for s in spans)
        for first in range(len(share)):
            assert read_in_step(share, first) == share_positions(share)[first:]


def test_open_shards_spread_a_slot_over_the_whole_epoch():
    """Issue 18: with one stripe a slot's share is one run of the epoch's sequence; with 4 it
    is 4 runs spread over it (the largest stretch of the sequence it skips is much shorter)."""
    def largest_gap(share: EpochShare) -> int:
        index = sorted(share._sequence_index(p) for p in range(len(share)))
        return max(b - a for a, b in zip(index, index[1:] + [index[0] + N]))

    for epoch in range(3):
        one, four = (EpochShare(plan(open_shards=k), epoch=epoch, slot=0, num_slots=4) for k in (1, 4))
        assert largest_gap(one) > 3 * N // 4 - 1
        assert largest_gap(four) <= N // 4 + 2


def test_shard_order_and_blocks_are_reshuffled_each_epoch_and_reproducible():
    orders = [EpochShare(plan(), epoch=e, slot=0, num_slots=1).shard_order for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [EpochShare(plan(), epoch=e, slot=0, num_slots=1).shard_order for e in range(4)]
    assert EpochShare(plan(seed=1), epoch=0, slot=0, num_slots=1).shard_order != orders[0] or \
        EpochShare(plan(seed=1), epoch=1, slot=0, num_slots=1).shard_order != orders[1]

    share = EpochShare(plan(), epoch=0, slot=0, num_slots=1)
    blocks = [share.block_order(b) for b in range(-(-N // 4))]
    assert [sorted(b) for b in blocks] == [list(range(lo, min(lo + 4, N))) for lo in range(0, N, 4)]
    assert blocks != [sorted(b) for b in blocks]
    assert share.block_order(0) != EpochShare(plan(), epoch=1, slot=0, num_slots=1).block_order(0)


def test_a_source_smaller_than_the_slots_gives_each_slot_a_sample_every_few_epochs():
    """Fewer samples than slots: each epoch goes to N of the slots, which ones rotating, so
    every slot reads within ceil(S / N) epochs and every epoch is still read exactly once."""
    num_slots = 2 * N + 3
    everything = Counter((shard, i) for shard, size in enumerate(SIZES) for i in range(size))
    for epoch in range(4):
        shares = [EpochShare(plan(), epoch=epoch, slot=s, num_slots=num_slots) for s in range(num_slots)]
        assert sorted({len(s) for s in shares}) == [0, 1]
        assert Counter(pos for share in shares for pos in share_positions(share)) == everything
    for slot in range(num_slots):
        reads = [samples_through(N, epoch=e, slot=slot, num_slots=num_slots) for e in range(-1, 3 * num_slots // N)]
        gaps = [b - a for a, b in zip(reads, reads[1:])]
        assert max(len(run) for run in "".join(map(str, gaps)).split("1")) < -(-num_slots // N)
