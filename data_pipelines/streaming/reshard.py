"""Carry stream positions over to another world size (or readers_per_rank).

Per source, the old slots were each somewhere in their own shares; let ``E`` be the
furthest pass any of them reached. What the old slots had left of every pass up to
``E`` becomes *pending segments* (old slot ``i``'s share of a pass from its position
on, emitted in the order the old slot would have used), dealt round-robin to the new
slots, which finish them before starting their own shares of the epoch after ``E`` under
the new layout (a pass is one epoch, or several for a source smaller than the slots, see
``epoch_plan``; the old and new layouts may differ in it). So no sample is skipped or
repeated within any epoch across the change; the price is that epochs up to ``E`` end
unevenly over the new slots. (If every old slot stood exactly at the start of ``E``,
nothing is pending and ``E`` starts afresh.)
"""
from __future__ import annotations

from data_pipelines.streaming.epoch_plan import epochs_per_pass, share_bounds
from data_pipelines.streaming.source_reader import Segment
from data_pipelines.streaming.stream_state import STATE_VERSION, next_batch, pack_segments, unpack_segments


def reshard_states(states: list[dict], *, world_size: int, readers_per_rank: int) -> list[dict]:
    """New per-rank states (index = new rank) from every old rank's state (index = old rank)."""
    old = states[0]["layout"]
    if old.get("version") != STATE_VERSION:
        raise ValueError(f"not a polytask data-stream state (version {STATE_VERSION})")
    if [s["layout"]["rank"] for s in states] != list(range(old["world_size"])):
        raise ValueError(f"need the states of all {old['world_size']} old ranks in rank order")
    batches = {next_batch(s) for s in states}
    if len(batches) != 1:
        raise ValueError(f"old ranks stopped at different batches {sorted(batches)}; they must come from one checkpoint")
    old_slots = old["world_size"] * old["readers_per_rank"]
    new_slots = world_size * readers_per_rank
    slot_states = [
        states[r]["readers"][str(l)]["sources"] for r in range(old["world_size"]) for l in range(old["readers_per_rank"])
    ]
    new_sources: list[dict[str, dict]] = [{} for _ in range(new_slots)]
    for name, info in old["sources"].items():
        n = info["num_samples"]
        step = epochs_per_pass(n, old_slots)  # epochs per pass of the old layout
        own = []
        for i, st in enumerate(slot_states):
            lo, hi = share_bounds(n, slot=i, num_slots=old_slots)
            epoch, position = st[name]["epoch"], st[name]["position"]
            if position == hi - lo:  # right after a share's last sample: the next pass's start
                epoch, position = epoch + step, 0
            own.append((epoch, position, unpack_segments(st[name]["pending"])))
        last = max(epoch for epoch, _, _ in own)
        untouched = all(epoch == last and position == 0 and not pending for epoch, position, pending in own)
        start = last if untouched else last + step
        segments = []
        for i, (epoch, position, pending) in enumerate(own):
            segments += pending
            # Old slots all move pass by pass from one first epoch, so ``start - epoch`` is a multiple of ``step``.
            segments += [Segment(e, old_slots, i, position if e == epoch else 0) for e in range(epoch, start, step)]
        for j in range(new_slots):
            mine = range(j, old_slots, new_slots)  # old counters, summed onto the new slots
            new_sources[j][name] = {
                "epoch": start,
                "position": 0,
                "pending": pack_segments(segments[j::new_slots]),
                "samples": sum(slot_states[i][name]["samples"] for i in mine),
                "bad": sum(slot_states[i][name]["bad"] for i in mine),
            }
    (batch,) = batches
    out = []
    for rank in range(world_size):
        readers = {}
        for reader in range(readers_per_rank):
            # The first batch at or after the old ranks' counter that this reader builds.
            first = batch + (reader - batch) % readers_per_rank
            readers[str(reader)] = {"next_batch": first, "sources": new_sources[rank * readers_per_rank + reader]}
        layout = {**old, "world_size": world_size, "rank": rank, "readers_per_rank": readers_per_rank}
        out.append({"layout": layout, "readers": readers})
    return out
