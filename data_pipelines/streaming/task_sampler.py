"""Which source each sample of a batch comes from.

A sampling strategy turns source sizes (and config weights) into a target mix;
:class:`TaskSampler` decides, for batch ``b`` of a reader slot, the source of each of its
samples. Every decision is a pure function of ``(seed, b, slot)``, so the sampler has no
state of its own: the stream's batch counter, which the checkpoint stores, is its
position, and any data-loader worker can compute the decisions for the batches it builds.

Global epochs. Reader slot ``s = rank * R + l`` (``R = readers_per_rank``) builds its
rank's batches ``l, l + R, ...``: in each *round* of ``R`` steps every slot builds one
batch. Rounds come in pairs. For pair ``u`` one composition ``z`` (samples per source, ``2
batch_size`` in all) is drawn for every slot alike; in the pair's first round each slot
takes ``floor(z_s / 2)`` of each source plus one more of half of the sources with an odd
``z_s`` (a seeded choice per slot, so slots and ranks differ), and in the second round the
rest of ``z``. So after every round each slot's count of each source is within one of
every other slot's, and after every pair they are equal: all slots advance through every
source together, and since slots read equal shares of every epoch (``epoch_plan``), no
sample of a source is read a second time before all its samples have been read once
(within a round, slots that have built their batch may be one batch ahead of those that
have not). The global per-round quotas of a source are the sum over the slots.

Composition:

- ``mixed``: a batch mixes sources. ``z`` is a systematic sample of the target mix whose
  offset follows a golden-ratio (Weyl) sequence over the pairs, so the realised mix stays
  within a few samples of the target at any point of the run (``bench/shuffle_quality``).
- ``homogeneous``: the whole batch comes from one source, and every slot of every rank picks
  the same one for a round (``R`` consecutive steps), so each optimizer step trains on one
  source (the MMDetection multi-source / Composer ``per_stream`` style).

``round_robin`` cycles through the sources in config order (sample by sample when mixed,
round by round when homogeneous); its target mix is uniform.
"""
from __future__ import annotations

import bisect
import itertools

from data_pipelines.streaming.seeding import derive_seed, permutation, uniform

STRATEGIES: tuple[str, ...] = ("proportional", "uniform", "fixed", "temperature", "round_robin")
COMPOSITIONS: tuple[str, ...] = ("mixed", "homogeneous")


def strategy_weights(
    strategy: str,
    *,
    num_samples: dict[str, int],
    fixed: dict[str, float] | None = None,
    temperature: float = 2.0,
) -> dict[str, float]:
    """Unnormalised target weight per source.

    ``proportional``: p ∝ n; ``uniform`` and ``round_robin``: equal; ``fixed``: ``fixed``
    as given; ``temperature``: p ∝ n^(1/T) (T=1 is proportional, T→∞ uniform).
    """
    if strategy == "proportional":
        return {name: float(n) for name, n in num_samples.items()}
    if strategy in ("uniform", "round_robin"):
        return {name: 1.0 for name in num_samples}
    if strategy == "fixed":
        if fixed is None or set(fixed) != set(num_samples):
            raise ValueError(f"sampling 'fixed' needs a weight for every source {sorted(num_samples)}, got {fixed}")
        return dict(fixed)
    if strategy == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return {name: float(n) ** (1.0 / temperature) for name, n in num_samples.items()}
    raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {list(STRATEGIES)}")


GOLDEN = (5**0.5 - 1) / 2  # the Weyl step with the most even spread


class TaskSampler:
    """Source decisions for every slot's batches; ``weights`` fix the order of the sources."""

    def __init__(
        self,
        weights: dict[str, float],
        *,
        strategy: str,
        composition: str,
        batch_size: int,
        seed: int,
        readers_per_rank: int,
    ) -> None:
        if not weights:
            raise ValueError("TaskSampler needs at least one source")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"sampling weights must be > 0, got {bad}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"unknown batch composition {composition!r}; expected one of {list(COMPOSITIONS)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {list(STRATEGIES)}")
        total = sum(weights.values())
        self.names = list(weights)
        self.probabilities = {name: w / total for name, w in weights.items()}
        self._cumulative = list(itertools.accumulate(w / total for w in weights.values()))
        self.strategy = strategy
        self.composition = composition
        self.batch_size = batch_size
        self.seed = seed
        self.readers_per_rank = readers_per_rank
        self._offset = uniform(derive_seed(seed, "sampler"))

    def batch_sources(self, batch: int, *, slot: int) -> list[str]:
        """The source of each sample of batch ``batch`` of reader slot ``slot`` (``batch_size`` names)."""
        round_ = batch // self.readers_per_rank
        if self.composition == "homogeneous":
            return [self.round_source(round_)] * self.batch_size
        counts = self.slot_counts(round_, slot=slot)
        names = [name for name, n in zip(self.names, counts) for _ in range(n)]
        order = permutation(len(names), seed=derive_seed(self.seed, "order", batch, slot))
        return [names[i] for i in order]

    def round_source(self, round_: int) -> str:
        """homogeneous: the one source of every batch of round ``round_``."""
        if self.strategy == "round_robin":
            return self.names[round_ % len(self.names)]
        return self._pick((self._offset + round_ * GOLDEN) % 1.0)

    def pair_counts(self, pair: int) -> list[int]:
        """mixed: samples per source (config order) every slot takes over the rounds of pair ``pair``."""
        n = 2 * self.batch_size
        counts = [0] * len(self.names)
        if self.strategy == "round_robin":
            for i in range(pair * n, (pair + 1) * n):
                counts[i % len(self.names)] += 1
            return counts
        start = (self._offset + pair * GOLDEN) % 1.0
        for j in range(n):  # systematic sampling: n evenly spaced points, shifted
            counts[self.names.index(self._pick((start + j) / n))] += 1
        return counts

    def slot_counts(self, round_: int, *, slot: int) -> list[int]:
        """mixed: samples per source (config order) of slot ``slot``'s batch of round ``round_``."""
        pair, second = divmod(round_, 2)
        z = self.pair_counts(pair)
        odd = [i for i, n in enumerate(z) if n % 2]
        # Half of the odd sources give this slot their extra sample in the first round.
        chosen = permutation(len(odd), seed=derive_seed(self.seed, "extras", pair, slot))[: len(odd) // 2]
        first = [n // 2 for n in z]
        for k in chosen:
            first[odd[k]] += 1
        return [a - b for a, b in zip(z, first)] if second else first

    def _pick(self, u: float) -> str:
        # min(): float rounding can leave the last cumulative value a hair below 1.
        return self.names[min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)]
