"""The checkpointed position of a rank's training stream, as plain data.

Layout (ints and strings only, fixed keys for a given config, so
``torch.distributed.checkpoint`` can load it into a freshly built loader's state)::

    {"layout": {"version", "seed", "world_size", "rank", "readers_per_rank", "block_size",
                "open_shards", "full_shuffle", "sources": {name: {"num_samples", "num_shards"}}},
     "readers": {"<l>": {"next_batch": b,            # the next batch this reader builds
                         "sources": {name: {"epoch", "position",   # next sample to read: epoch,
                                                        # position in the slot's share of it (epoch_plan)
                                            "pending",  # segments left by a world-size change, flat
                                                        # [epoch, num_slots, slot, position, stop] * k
                                            "samples", "bad"}}}}}  # delivered / dropped

Reader ``l`` builds the rank's batches ``l, l + R, l + 2R, ...`` (R readers per rank),
so the rank's batch counter is the smallest ``next_batch``.
"""
from __future__ import annotations

from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.streaming.source_reader import Segment

# 2: one global epoch per source (issue 18): shares rotate per epoch, stripes, sampler by slot.
STATE_VERSION = 2


def stream_layout(*, seed: int, world_size: int, rank: int, readers_per_rank: int, plans: list[SourcePlan]) -> dict:
    """What a saved position is only valid for."""
    return {
        "version": STATE_VERSION,
        "seed": seed,
        "world_size": world_size,
        "rank": rank,
        "readers_per_rank": readers_per_rank,
        # Positions count samples in shuffled-block order, which the block size shapes.
        "block_size": plans[0].block_size,
        "open_shards": plans[0].open_shards,
        "full_shuffle": plans[0].full_shuffle,
        "sources": {p.name: {"num_samples": p.num_samples, "num_shards": len(p.shard_sizes)} for p in plans},
    }


def initial_state(layout: dict) -> dict:
    """Every reader at the start of epoch 0 of every source."""
    sources = {name: {"epoch": 0, "position": 0, "pending": [], "samples": 0, "bad": 0} for name in layout["sources"]}
    return {
        "layout": layout,
        "readers": {
            str(reader): {"next_batch": reader, "sources": {n: dict(c) for n, c in sources.items()}}
            for reader in range(layout["readers_per_rank"])
        },
    }


def check_compatible(saved: dict, layout: dict) -> None:
    """Raise ``ValueError`` naming every way ``saved`` does not fit this job's ``layout``."""
    old = saved.get("layout")
    if isinstance(old, dict) and old.get("version") == 1:
        raise ValueError(
            "the data-stream state in the checkpoint was written by an older polytask (version 1: per-slot "
            "epochs), whose sample order this one no longer computes; resume it with the polytask that wrote it"
        )
    if not isinstance(old, dict) or old.get("version") != STATE_VERSION:
        raise ValueError(f"not a polytask data-stream state (version {STATE_VERSION}): keys {sorted(saved)}")
    problems = [
        f"{key} {old.get(key)} -> {layout[key]}"
        for key in ("seed", "world_size", "rank", "readers_per_rank", "block_size", "open_shards", "full_shuffle")
        if old.get(key) != layout[key]
    ]
    if old.get("sources") != layout["sources"]:
        problems.append(f"sources {old.get('sources')} -> {layout['sources']}")
    if problems:
        raise ValueError(
            "the data-stream state in the checkpoint belongs to another data layout: "
            + "; ".join(problems)
            + " (positions are per reader slot of world_size x data.readers_per_rank and per source; num_workers "
            "may change freely; for a new world_size or readers_per_rank pass every old rank's state through "
            "data_pipelines.streaming.reshard.reshard_states)"
        )


def merge_worker_states(states: list[dict]) -> dict:
    """One rank state from its data-loader workers' states.

    Each reader is built by exactly one worker; the others hold it at its start, so the
    most advanced copy (largest ``next_batch``) is the real one.
    """
    merged = {"layout": states[0]["layout"], "readers": {}}
    for key in states[0]["readers"]:
        merged["readers"][key] = max((s["readers"][key] for s in states), key=lambda r: r["next_batch"])
    return merged


def pack_segments(segments: list[Segment]) -> list[int]:
    """Segments as a flat int list (a fixed-type leaf for torch.distributed.checkpoint)."""
    return [v for seg in segments for v in (seg.epoch, seg.num_slots, seg.slot, seg.position, seg.stop)]


def unpack_segments(flat: list[int]) -> list[Segment]:
    return [Segment(*flat[i : i + 5]) for i in range(0, len(flat), 5)]


def next_batch(state: dict) -> int:
    """Batches of this rank handed out so far."""
    return min(r["next_batch"] for r in state["readers"].values())
