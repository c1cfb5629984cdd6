"""Python's garbage collector on a step schedule, the same on every rank (torchtitan's
``gc_freq`` idea).

Automatic collections start whenever a rank has allocated enough objects, so ranks pause
at different moments and the others wait for them at the next collective. A full one
walks every object of the process (~350 k here): on an H100 host the median checkpoint
save took 355 ms with automatic collection and 245 ms without (bench/checkpoint_save.py
--gc auto|trainer), the difference being collections in DCP's planning. With ``trainer.gc_every: N`` automatic collection is off, and every rank
collects the young generations every N steps and everything every 10 N steps, together.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


class StepGarbageCollection:
    def __init__(self, every: int) -> None:
        self.every = every
        if every > 0:
            gc.collect()  # what set-up left behind, once
            gc.disable()

    def step(self, step: int) -> None:
        if self.every <= 0 or step % self.every:
            return
        t0 = time.perf_counter()
        full = step % (10 * self.every) == 0
        gc.collect(2 if full else 1)
        log.debug("gc generation %d at step %d: %.1f ms", 2 if full else 1, step, 1e3 * (time.perf_counter() - t0))

    def close(self) -> None:
        """Back to Python's automatic collection (the process may go on: tests, evaluation)."""
        if self.every > 0:
            gc.enable()
