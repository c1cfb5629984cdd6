"""Carry stream positions over to another world size (or readers_per_rank).

Per source, the old slots were each somewhere in their shares (all within a sample or a
batch of each other, see ``task_sampler``); let ``E`` be the furthest epoch any of them
reached. What the old slots had left of every epoch up to ``E`` becomes *pending
segments* (pieces of old slots' shares, emitted in the order the old slot would have
used), split evenly over the new slots (their sample counts differ by at most one), which
finish them before starting their own shares of epoch ``E + 1`` under the new layout. So
no sample is skipped or repeated within any epoch across the change, and the new slots
still finish every epoch together. (If every old slot stood exactly at the start of ``E``,
nothing is pending and ``E`` starts afresh.)
"""
from __future__ import annotations

from data_pipelines.streaming.epoch_plan import samples_through, share_bounds
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
        own = []
        for i, st in enumerate(slot_states):
            epoch, position = _normalised(n, st[name]["epoch"], st[name]["position"], slot=i, num_slots=old_slots)
            own.append((epoch, position, unpack_segments(st[name]["pending"])))
        last = max(epoch for epoch, _, _ in own)
        untouched = all(epoch == last and position == 0 and not pending for epoch, position, pending in own)
        start = last if untouched else last + 1
        segments = []
        for i, (epoch, position, pending) in enumerate(own):
            segments += pending
            for e in range(epoch, start):
                lo, hi = share_bounds(n, epoch=e, slot=i, num_slots=old_slots)
                first = position if e == epoch else 0
                if first < hi - lo:
                    segments.append(Segment(e, old_slots, i, first, hi - lo))
        dealt = _split_evenly(segments, new_slots)
        for j in range(new_slots):
            mine = range(j, old_slots, new_slots)  # old counters, summed onto the new slots
            new_sources[j][name] = {
                "epoch": start,
                "position": 0,
                "pending": pack_segments(dealt[j]),
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


def _normalised(num_samples: int, epoch: int, position: int, *, slot: int, num_slots: int) -> tuple[int, int]:
    """(epoch, position) of the next sample a slot reads: past a finished share, and past
    epochs that give the slot no sample, the next epoch's start."""
    lo, hi = share_bounds(num_samples, epoch=epoch, slot=slot, num_slots=num_slots)
    if position < hi - lo:
        return epoch, position
    epoch += 1
    while samples_through(num_samples, epoch=epoch, slot=slot, num_slots=num_slots) == samples_through(
        num_samples, epoch=epoch - 1, slot=slot, num_slots=num_slots
    ):
        epoch += 1
    return epoch, 0


def _split_evenly(segments: list[Segment], parts: int) -> list[list[Segment]]:
    """``segments`` cut into ``parts`` runs of consecutive items whose sizes differ by at most one."""
    total = sum(seg.stop - seg.position for seg in segments)
    out: list[list[Segment]] = []
    queue = list(segments)
    for j in range(parts):
        want = (total + j) // parts
        mine: list[Segment] = []
        while want:
            seg = queue.pop(0)
            take = min(want, seg.stop - seg.position)
            mine.append(Segment(seg.epoch, seg.num_slots, seg.slot, seg.position, seg.position + take))
            if seg.position + take < seg.stop:
                queue.insert(0, Segment(seg.epoch, seg.num_slots, seg.slot, seg.position + take, seg.stop))
            want -= take
        out.append(mine)
    return out
