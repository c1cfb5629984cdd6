"""A world-size change carries the stream over: no sample is skipped or repeated
within any epoch, across the change."""
import itertools
from collections import Counter

import pytest

from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.reshard import reshard_states
from data_pipelines.streaming.source_reader import SourceReader
from data_pipelines.streaming.stream_state import pack_segments, unpack_segments
from data_pipelines.streaming.config import TransformConfig
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source

SIZES = [5, 5, 5, 5, 3, 4]  # 27 samples


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    samples = [boxed_sample(f"r{i:03d}", height=8, width=8, seed=i, category_id=1, class_id=0) for i in range(sum(SIZES))]
    manifest = write_source(root, samples, name="s", tasks=["classification"], shard_sizes=SIZES, classes=["a"])
    plan = SourcePlan(name="s", urls=tuple(manifest.shard_urls()), shard_sizes=tuple(SIZES), seed=2, block_size=3)
    return root, plan


def states_of(readers: list[SourceReader], *, world_size: int, per_rank: int, batch: int) -> list[dict]:
    """Rank states, as the stream writes them, for slots standing where ``readers`` stand."""
    layout = {"version": 2, "seed": 2, "world_size": world_size, "readers_per_rank": per_rank, "block_size": 3,
              "open_shards": 1, "full_shuffle": False,
              "sources": {"s": {"num_samples": sum(SIZES), "num_shards": len(SIZES)}}}
    return [
        {"layout": {**layout, "rank": rank}, "readers": {
            str(l): {"next_batch": batch + (l - batch) % per_rank, "sources": {"s": {
                "epoch": r.epoch, "position": r.position, "pending": pack_segments(r.pending), "samples": 0, "bad": 0}}}
            for l, r in enumerate(readers[rank * per_rank : (rank + 1) * per_rank])}}
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("old, new", [
    ((2, 2), (3, 1)), ((2, 2), (1, 1)), ((1, 3), (2, 2)),
    # Issue 14 item 5: more slots than the 27 samples, so passes of several epochs (2 for
    # 32 slots, 3 for 63): to and from such a layout, and between two of them.
    ((2, 2), (4, 8)), ((4, 8), (7, 9)),
])
def test_every_epoch_stays_exactly_once_across_changes_of_world_size(source, old, new):
    _, plan = source
    seen: list[tuple[int, str]] = []

    def take(reader: SourceReader, n: int) -> None:
        seen.extend((item.epoch, item.payload["__key__"]) for item in itertools.islice(reader, n))

    # Old layout: slots stopped at different points, some already into epoch 1.
    slots = old[0] * old[1]
    readers = [SourceReader(plan, slot=i, num_slots=slots) for i in range(slots)]
    for i, reader in enumerate(readers):
        take(reader, 3 + 4 * i)
    # Change of layout twice (old -> new -> old), each time after some more reading.
    layout = old
    for world_size, per_rank in (new, old):
        states = states_of(readers, world_size=layout[0], per_rank=layout[1], batch=17)
        new_states = reshard_states(states, world_size=world_size, readers_per_rank=per_rank)
        assert [s["layout"]["rank"] for s in new_states] == list(range(world_size))
        readers = []
        for rank, state in enumerate(new_states):
            for l in range(per_rank):
                assert state["readers"][str(l)]["next_batch"] >= 17
                counts = state["readers"][str(l)]["sources"]["s"]
                readers.append(SourceReader(plan, slot=rank * per_rank + l, num_slots=world_size * per_rank,
                                            epoch=counts["epoch"], position=counts["position"],
                                            pending=unpack_segments(counts["pending"])))
        for i, reader in enumerate(readers):
            take(reader, 5 + 3 * i)
        layout = (world_size, per_rank)
    # Finish every epoch any slot has started.
    last = max(e for e, _ in seen)
    for reader in readers:
        while reader.pending or reader.epoch <= last:
            take(reader, 1)
    everything = Counter(f"r{i:03d}" for i in range(sum(SIZES)))
    for epoch in range(last + 1):
        assert Counter(k for e, k in seen if e == epoch) == everything, epoch


def test_resharded_loader_states_load_and_run(source):
    root, _ = source

    def cfg(readers_per_rank):
        return DataConfig(sources=[SourceConfig(path=str(root))], batch_size=2, num_workers=0,
                          readers_per_rank=readers_per_rank, seed=2, shuffle_buffer=3,
                          transforms=TransformConfig(image_size=8))

    old = [build_train_loader(cfg(2), rank=r, world_size=2)[0] for r in range(2)]
    for loader in old:
        list(itertools.islice(loader, 5))
    states = reshard_states([l.state_dict() for l in old], world_size=3, readers_per_rank=1)
    for rank, state in enumerate(states):
        loader = build_train_loader(cfg(1), rank=rank, world_size=3)[0]
        loader.load_state_dict(state)
        assert len(next(iter(loader)).keys) == 2
    with pytest.raises(ValueError, match="all 2 old ranks"):
        reshard_states([old[0].state_dict()], world_size=3, readers_per_rank=1)
