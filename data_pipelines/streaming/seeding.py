"""Seeds and permutations that are pure functions of their inputs, stable across
processes, platforms and Python versions (a resumed run may run on another machine).
"""
from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes (unlike ``hash`` of a str)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def permutation(n: int, *, seed: int) -> list[int]:
    """A seeded random permutation of ``range(n)``.

    Fisher-Yates on ``random()``, not ``random.shuffle``: Python guarantees the
    ``random()`` sequence of a seeded generator across versions, not ``shuffle``'s.
    """
    rng = random.Random(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def uniform(seed: int) -> float:
    """One uniform draw in [0, 1) from ``seed``: a counter-based generator, so draw ``i``
    needs no state beyond ``i``."""
    return random.Random(seed).random()
