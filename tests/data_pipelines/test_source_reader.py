"""A reader slot's stream of one source: exactly once per epoch, exact and cheap resume.

Shards are read through ``pipe:`` URLs that log every opening, so the test sees which
shards a reader really opens."""
from collections import Counter

import pytest

from data_pipelines.streaming.epoch_plan import EpochShare, SourcePlan, samples_through
from data_pipelines.streaming.source_reader import SourceReader
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source

SIZES = [4, 4, 4, 4, 4, 4, 3, 2]  # uneven, 29 samples
SLOTS = 3
BLOCK = 3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    samples = [boxed_sample(f"k{i:03d}", height=8, width=8, seed=i, category_id=1) for i in range(sum(SIZES))]
    manifest = write_source(root, samples, name="s", tasks=["detection"], shard_sizes=SIZES,
                            categories=[{"id": 1, "name": "x"}])
    log = root / "opened.log"
    urls = tuple(f"pipe:echo {i} >> {log} && cat {url}" for i, url in enumerate(manifest.shard_urls()))
    return SourcePlan(name="s", urls=urls, shard_sizes=tuple(SIZES), seed=5, block_size=BLOCK, open_shards=2), log


def keys(reader: SourceReader, n: int) -> list[tuple[int, str]]:
    return [(item.epoch, item.payload["__key__"]) for item in (next(reader) for _ in range(n))]


def test_every_epoch_is_read_exactly_once_over_the_slots(source):
    plan, _ = source
    epochs: dict[int, Counter] = {0: Counter(), 1: Counter()}
    orders = {0: [], 1: []}
    for slot in range(SLOTS):
        reader = SourceReader(plan, slot=slot, num_slots=SLOTS)
        total = samples_through(sum(SIZES), epoch=1, slot=slot, num_slots=SLOTS)
        for epoch, key in keys(reader, total):
            epochs[epoch][key] += 1
            orders[epoch].append(key)
    everything = Counter(f"k{i:03d}" for i in range(sum(SIZES)))
    assert epochs[0] == everything and epochs[1] == everything
    assert orders[0] != orders[1]


def test_resume_anywhere_continues_exactly_and_reopens_only_the_current_block(source):
    plan, log = source
    for slot in range(SLOTS):
        reader = SourceReader(plan, slot=slot, num_slots=SLOTS)
        total = 2 * reader.share_size + 2
        expected = keys(reader, total)
        for cut in range(total):
            first = SourceReader(plan, slot=slot, num_slots=SLOTS)
            head = keys(first, cut)
            log.write_text("")
            resumed = SourceReader(plan, slot=slot, num_slots=SLOTS, epoch=first.epoch, position=first.position)
            share = EpochShare(plan, epoch=resumed.epoch, slot=slot, num_slots=SLOTS)
            lo, hi = share.block_bounds(resumed.position // BLOCK)
            # Only the shards of the block being emitted are (re)opened to finish it.
            tail = keys(resumed, min(hi - resumed.position, total - cut))
            block_shards = {share.locate(p)[0] for p in range(lo, hi)}
            opened = [int(line) for line in log.read_text().split()]
            assert len(opened) == len(set(opened)) and set(opened) <= block_shards, (slot, cut)
            tail += keys(resumed, total - cut - len(tail))
            assert head + tail == expected, (slot, cut)


SMALL_SLOTS = 2 * sum(SIZES) + 3  # more than twice the samples: a slot reads every 2-3 epochs


def test_a_source_smaller_than_the_slots_gives_every_slot_samples_and_each_epoch_once(source):
    """More slots than samples: each epoch goes to some of the slots; over the slots, every
    epoch is read exactly once, and a slot goes on to the next epoch that gives it a sample."""
    plan, _ = source
    epochs: dict[int, Counter] = {}
    for slot in range(SMALL_SLOTS):
        reader = SourceReader(plan, slot=slot, num_slots=SMALL_SLOTS)
        total = samples_through(sum(SIZES), epoch=5, slot=slot, num_slots=SMALL_SLOTS)
        assert total >= 2
        for epoch, key in keys(reader, total):
            epochs.setdefault(epoch, Counter())[key] += 1
        assert reader.epoch >= 6 and reader.position == 0
    everything = Counter(f"k{i:03d}" for i in range(sum(SIZES)))
    assert sorted(epochs) == list(range(6)) and all(seen == everything for seen in epochs.values())


@pytest.mark.parametrize("slot", [0, 31, SMALL_SLOTS - 1])
def test_a_small_source_resumes_anywhere_exactly(source, slot):
    plan, _ = source
    total = 3 * SourceReader(plan, slot=slot, num_slots=SMALL_SLOTS).share_size + 1
    expected = keys(SourceReader(plan, slot=slot, num_slots=SMALL_SLOTS), total)
    for cut in range(total):
        first = SourceReader(plan, slot=slot, num_slots=SMALL_SLOTS)
        head = keys(first, cut)
        resumed = SourceReader(plan, slot=slot, num_slots=SMALL_SLOTS, epoch=first.epoch, position=first.position)
        assert head + keys(resumed, total - cut) == expected, cut
