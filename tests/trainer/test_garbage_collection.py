"""trainer.gc_every: cyclic garbage is collected at the scheduled steps, not in between."""
import gc
import weakref

import pytest

from trainer.config import TrainerConfig
from trainer.garbage_collection import StepGarbageCollection


class _Node:
    pass


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the cycle collector frees these
    return weakref.ref(a)


def test_collects_on_schedule_only():
    collector = StepGarbageCollection(every=5)
    try:
        assert not gc.isenabled()
        garbage = _cycle()
        for _ in range(50_000):  # far past the allocation threshold that would trigger automatic GC
            [_Node()]
        for step in range(1, 5):
            collector.step(step)
            assert garbage() is not None, f"collected at step {step}"
        collector.step(5)
        assert garbage() is None
    finally:
        collector.close()
    assert gc.isenabled()


def test_zero_keeps_automatic_collection():
    gc.enable()
    collector = StepGarbageCollection(every=0)
    assert gc.isenabled()
    collector.step(10)
    collector.close()
    assert gc.isenabled()


def test_negative_is_a_config_error():
    with pytest.raises(ValueError, match="trainer.gc_every"):
        TrainerConfig(gc_every=-1)
