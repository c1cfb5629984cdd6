"""Which source the next training sample comes from.

A sampling strategy turns source sizes (and config weights) into probabilities;
:class:`TaskSampler` draws from them. Draw ``i`` is a pure function of ``(seed, i)``,
so the sampler's whole state is a counter and resuming continues the same sequence.
"""
from __future__ import annotations

import bisect
import itertools
import random

STRATEGIES: tuple[str, ...] = ("proportional", "uniform", "fixed", "temperature")


def strategy_weights(
    strategy: str,
    *,
    num_samples: dict[str, int],
    fixed: dict[str, float] | None = None,
    temperature: float = 2.0,
) -> dict[str, float]:
    """Unnormalised sampling weight per source.

    ``proportional``: p ∝ n; ``uniform``: equal; ``fixed``: ``fixed`` as given;
    ``temperature``: p ∝ n^(1/T) (T=1 is proportional, T→∞ uniform).
    """
    if strategy == "proportional":
        return {name: float(n) for name, n in num_samples.items()}
    if strategy == "uniform":
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
    """Draws source names with probability proportional to ``weights``."""

    def __init__(self, weights: dict[str, float], *, seed: int) -> None:
        if not weights:
            raise ValueError("TaskSampler needs at least one source")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"sampling weights must be > 0, got {bad}")
        total = sum(weights.values())
        self.names = list(weights)
        self.probabilities = {name: w / total for name, w in weights.items()}
        self._cumulative = list(itertools.accumulate(w / total for w in weights.values()))
        self.seed = seed
        self.num_draws = 0

    def sample(self) -> str:
        # A string seed is hashed with sha512 by `random`, so it is stable across processes.
        u = random.Random(f"{self.seed}/{self.num_draws}").random()
        self.num_draws += 1
        # min(): float rounding can leave the last cumulative value a hair below 1.
        return self.names[min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_draws": self.num_draws}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.num_draws = int(state["num_draws"])
