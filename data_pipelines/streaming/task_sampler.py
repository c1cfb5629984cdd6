"""Which source each sample of a batch comes from.

A sampling strategy turns source sizes (and config weights) into a target mix;
:class:`TaskSampler` decides, for batch ``b`` of a rank, the source of each of its
samples. Every decision is a pure function of ``(seed, b, j)`` (plus the rank where
ranks may differ), so the sampler has no state of its own: the stream's batch counter,
which the checkpoint stores, is its position, and any data-loader worker can compute
the decisions for the batches it builds.

Composition:

- ``mixed``: each sample draws its source independently; every rank draws its own.
- ``homogeneous``: the whole batch comes from one source, and every rank picks the
  same one for the same batch, so each optimizer step trains on one source (the
  MMDetection multi-source / Composer ``per_stream`` style).

``round_robin`` cycles through the sources in config order (sample by sample when
mixed, batch by batch when homogeneous); its target mix is uniform.
"""
from __future__ import annotations

import bisect
import itertools

from data_pipelines.streaming.seeding import derive_seed, uniform

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


class TaskSampler:
    """Source decisions for a rank's batches; ``weights`` fix the order of the sources."""

    def __init__(
        self,
        weights: dict[str, float],
        *,
        strategy: str,
        composition: str,
        batch_size: int,
        seed: int,
        rank: int,
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
        # Homogeneous batches must agree across ranks; mixed ones need not, and differ.
        self.rank = rank if composition == "mixed" else 0

    def batch_sources(self, batch: int) -> list[str]:
        """The source of each sample of batch ``batch`` (``batch_size`` names)."""
        if self.composition == "homogeneous":
            return [self._pick(batch, draw=(batch,))] * self.batch_size
        return [self._pick(batch * self.batch_size + j, draw=(batch, j)) for j in range(self.batch_size)]

    def _pick(self, counter: int, *, draw: tuple[int, ...]) -> str:
        if self.strategy == "round_robin":
            return self.names[counter % len(self.names)]
        u = uniform(derive_seed(self.seed, "sampler", self.rank, *draw))
        # min(): float rounding can leave the last cumulative value a hair below 1.
        return self.names[min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)]
