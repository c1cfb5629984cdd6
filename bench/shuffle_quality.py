"""Shuffle quality of the training stream's sample order: how far it is from a uniform
random permutation (issue 18). No I/O: the order comes from the epoch plan and sampler alone
(``EpochShare``, ``TaskSampler``), exactly as the loader emits it.

A class-sorted source (``--classes`` classes of ``--per-class`` samples, the layout an
ImageFolder converted with ``--order original`` has: shards of ``--shard`` samples, class
by class) or the same source as converters write it by default (``--order shuffled``) is
read for one epoch on ``--world`` ranks x ``--readers`` reader slots, batch ``--batch``.
Per configuration (shuffle buffer, open shards, full shuffle):

- ``distinct/window``: distinct classes per window of ``--window`` consecutive batches of a
  rank, averaged over every window of every rank; ``uniform`` is the same for uniformly
  random permutations (the target);
- ``worst class share``: the largest share one class takes of a window, averaged;
- ``|rank corr|``: Spearman correlation between the order a rank trains its samples in and
  their order in the shards (0: no trace of the shard order; 1: read in shard order).

    .venv/bin/python -m bench.shuffle_quality [--order original] [--classes 10 --per-class 24 --shard 1000]
"""
from __future__ import annotations

import argparse
import itertools
import random
import statistics

from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.streaming.source_reader import SourceReader
from data_pipelines.streaming.seeding import permutation


class _Positions(SourceReader):
    """A source reader that hands out positions, not samples: the plan without the I/O."""

    def _generate(self):  # noqa: ANN202 - overrides the reading generator
        from data_pipelines.streaming.epoch_plan import EpochShare

        while True:
            share = EpochShare(self.plan, epoch=self.epoch, slot=self.slot, num_slots=self.num_slots)
            for emitted, pos in enumerate(share.emission_order(), start=1):
                self.epoch, self.position = (self._next_epoch(self.epoch), 0) if emitted == len(share) else \
                    (self.epoch, emitted)
                yield share.locate(pos)


def stream_order(plan: SourcePlan, *, world: int, readers: int, batch: int, steps: int) -> list[list[list[tuple]]]:
    """Per rank, per step, the (shard, index) positions of its batch (one source)."""
    slots = world * readers
    streams = [_Positions(plan, slot=s, num_slots=slots) for s in range(slots)]
    return [[[next(streams[r * readers + b % readers]) for _ in range(batch)] for b in range(steps)]
            for r in range(world)]


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def window_stats(ranks: list[list[list[int]]], window: int) -> tuple[float, float]:
    """(mean distinct classes, mean largest class share) over every window of every rank."""
    distinct, worst = [], []
    for steps in ranks:
        for i in range(len(steps) - window + 1):
            classes = [c for step in steps[i : i + window] for c in step]
            counts = [classes.count(c) for c in set(classes)]
            distinct.append(len(counts))
            worst.append(max(counts) / len(classes))
    return statistics.fmean(distinct), statistics.fmean(worst)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--shard", type=int, default=1000, help="samples per shard (the converters' default)")
    parser.add_argument("--order", choices=["original", "shuffled"], default="original")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", type=int, default=4, help="consecutive batches of a rank")
    parser.add_argument("--buffers", default="64,256,1024")
    parser.add_argument("--open-shards", default="1,2,4,8")
    args = parser.parse_args()

    n = args.classes * args.per_class
    # Class of the sample at each place of the shard layout (what the converter wrote).
    layout = [i // args.per_class for i in range(n)]
    if args.order == "shuffled":
        layout = [layout[i] for i in permutation(n, seed=0)]
    sizes = tuple(min(args.shard, n - s) for s in range(0, n, args.shard))
    steps = n // (args.world * args.batch)  # one epoch

    rng = random.Random(0)
    uniform = []
    for _ in range(50):
        perm = rng.sample(layout, n)
        ranks = [[perm[(b * args.world + r) * args.batch : (b * args.world + r + 1) * args.batch]
                  for b in range(steps)] for r in range(args.world)]
        uniform.append(window_stats(ranks, args.window))
    print(f"{args.order} source: {args.classes} classes x {args.per_class}, shards of {args.shard}; "
          f"{args.world} ranks x "
          f"{args.readers} readers, batch {args.batch}; windows of {args.window} batches; one epoch")
    print(f"{'configuration':34s} {'distinct/window':>16s} {'worst class share':>18s} {'|rank corr|':>12s}")
    print(f"{'uniform random permutation':34s} {statistics.fmean(u[0] for u in uniform):16.2f} "
          f"{statistics.fmean(u[1] for u in uniform):18.2f} {'0':>12s}")
    grid = itertools.product(args.buffers.split(","), args.open_shards.split(","))
    configs = [(int(b), int(k), False) for b, k in grid]
    configs.append((1, 1, True))
    for buffer, open_shards, full in configs:
        plan = SourcePlan(name="s", urls=("",) * len(sizes), shard_sizes=sizes, seed=0, block_size=buffer,
                          open_shards=open_shards, full_shuffle=full)
        order = stream_order(plan, world=args.world, readers=args.readers, batch=args.batch, steps=steps)
        place = [[[shard * args.shard + index for shard, index in step] for step in rank] for rank in order]
        classes = [[[layout[p] for p in step] for step in rank] for rank in place]
        distinct, worst = window_stats(classes, args.window)
        flat = [[p for step in rank for p in step] for rank in place]
        corr = statistics.fmean(abs(spearman(list(range(len(f))), f)) for f in flat)
        name = "full shuffle (random access)" if full else f"buffer {buffer:5d}, open_shards {open_shards}"
        print(f"{name:34s} {distinct:16.2f} {worst:18.2f} {corr:12.2f}")


if __name__ == "__main__":
    main()
