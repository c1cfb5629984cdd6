from collections import Counter

import pytest

from data_pipelines.streaming.epoch_plan import EpochShare, SourcePlan

# Uneven shards, one of them empty: shares must still partition every epoch.
SIZES = (5, 0, 3, 7, 1, 6)
N = sum(SIZES)


def plan(seed: int = 0, block_size: int = 4) -> SourcePlan:
    urls = tuple(f"s-{i}.tar" for i in range(len(SIZES)))
    return SourcePlan(name="s", urls=urls, shard_sizes=SIZES, seed=seed, block_size=block_size)


def share_positions(share: EpochShare) -> list[tuple[int, int]]:
    return [share.locate(p) for p in range(len(share))]


@pytest.mark.parametrize("num_slots", [1, 3, 4, 7, N])
def test_slot_shares_partition_every_epoch_and_differ_by_at_most_one(num_slots):
    everything = Counter((shard, i) for shard, size in enumerate(SIZES) for i in range(size))
    for epoch in range(3):
        shares = [EpochShare(plan(), epoch=epoch, slot=s, num_slots=num_slots) for s in range(num_slots)]
        seen = Counter(pos for share in shares for pos in share_positions(share))
        assert seen == everything
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_spans_are_the_share_in_reading_order_and_touch_only_its_shards():
    for slot in range(4):
        share = EpochShare(plan(), epoch=1, slot=slot, num_slots=4)
        for first in range(len(share)):
            spans = share.spans(first)
            read = [(s.shard, i) for s in spans for i in range(s.start, s.stop)]
            assert read == share_positions(share)[first:]
            assert all(s.stop > s.start for s in spans)


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


@pytest.mark.parametrize("num_slots", [N + 1, 2 * N, 2 * N + 1, 5 * N - 2])
def test_a_source_smaller_than_the_slots_is_dealt_out_several_epochs_at_a_time(num_slots):
    """Issue 14 item 5: fewer samples than slots: a pass of P = ceil(S / N) epochs is split
    over the slots, so every slot gets a sample and every epoch is still read exactly once."""
    from data_pipelines.streaming.epoch_plan import epochs_per_pass

    passes = epochs_per_pass(N, num_slots)
    assert passes == -(-num_slots // N) > 1
    everything = Counter((shard, i) for shard, size in enumerate(SIZES) for i in range(size))
    for first in (0, passes):  # two passes
        shares = [EpochShare(plan(), epoch=first, slot=s, num_slots=num_slots) for s in range(num_slots)]
        assert min(map(len, shares)) >= 1 and max(map(len, shares)) - min(map(len, shares)) <= 1
        by_epoch: dict[int, Counter] = {}
        for share in shares:
            for p in range(len(share)):
                by_epoch.setdefault(share.epoch_of(p), Counter())[share.locate(p)] += 1
            read = [(s.shard, i) for s in share.spans(0) for i in range(s.start, s.stop)]
            assert read == share_positions(share)  # a share spanning two epochs reads in order too
        assert sorted(by_epoch) == list(range(first, first + passes))
        assert all(seen == everything for seen in by_epoch.values())
