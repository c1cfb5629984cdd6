from collections import Counter

import pytest

from data_pipelines.streaming.task_sampler import TaskSampler, strategy_weights

SIZES = {"coco": 100, "ade": 300, "imagenet": 600}
# Realised fractions over 20,000 draws must be within this of the target (> 4 standard
# deviations of a binomial fraction at p = 0.5).
TOLERANCE = 0.015


READERS = 2


def sampler(strategy="proportional", *, composition="mixed", batch_size=8, seed=0, **kwargs) -> TaskSampler:
    weights = strategy_weights(strategy, num_samples=SIZES, **kwargs)
    return TaskSampler(weights, strategy=strategy, composition=composition, batch_size=batch_size, seed=seed,
                       readers_per_rank=READERS)


def draws(s: TaskSampler, batches: range, *, slot: int = 0) -> list[str]:
    return [name for b in batches for name in s.batch_sources(b, slot=slot)]


def test_same_seed_same_sequence_other_seed_differs():
    a = draws(sampler(seed=3), range(100))
    assert a == draws(sampler(seed=3), range(100))
    assert a != draws(sampler(seed=4), range(100))


@pytest.mark.parametrize(
    "strategy, kwargs, target",
    [
        ("proportional", {}, [0.1, 0.3, 0.6]),
        ("uniform", {}, [1 / 3, 1 / 3, 1 / 3]),
        ("fixed", {"fixed": {"coco": 1.0, "ade": 1.0, "imagenet": 2.0}}, [0.25, 0.25, 0.5]),
        # n^(1/2): 10, 17.32, 24.49
        ("temperature", {"temperature": 2.0}, [10 / 51.815, 17.3205 / 51.815, 24.4949 / 51.815]),
        ("round_robin", {}, [1 / 3, 1 / 3, 1 / 3]),
    ],
)
@pytest.mark.parametrize("composition, batch_size", [("mixed", 8), ("homogeneous", 1)])
def test_realised_mix_converges_to_target(strategy, kwargs, target, composition, batch_size):
    s = sampler(strategy, composition=composition, batch_size=batch_size, **kwargs)
    assert list(s.probabilities.values()) == pytest.approx(target, abs=1e-4)
    n = 20_000
    counts = Counter(draws(s, range(n // batch_size)))
    for name, p in zip(SIZES, target):
        assert counts[name] / n == pytest.approx(p, abs=TOLERANCE), name


def test_homogeneous_batches_have_one_source_and_agree_across_ranks():
    ranks = [sampler(composition="homogeneous") for _ in range(3)]
    for b in range(200):
        batches = [s.batch_sources(b, slot=r * READERS + b % READERS) for r, s in enumerate(ranks)]
        assert len(set(batches[0])) == 1 and batches[0] == batches[1] == batches[2]


def test_mixed_batches_differ_across_ranks():
    assert draws(sampler(), range(50), slot=0) != draws(sampler(), range(50), slot=READERS)


def test_round_robin_cycles_in_config_order():
    names = list(SIZES)
    mixed = sampler("round_robin", batch_size=3)
    # A pair of rounds (2 x 3 samples per slot) takes every source twice, over its two rounds.
    for slot in range(4):
        pair = draws(mixed, [0, READERS], slot=slot)
        assert Counter(pair) == Counter(names * 2)
    homogeneous = sampler("round_robin", composition="homogeneous", batch_size=2)
    # One source per round of READERS steps, cycling in config order.
    assert [homogeneous.batch_sources(b, slot=0) for b in range(6)] == [[names[b // READERS % 3]] * 2 for b in range(6)]


def test_decisions_are_a_function_of_the_batch_index_so_resuming_continues():
    # The sampler keeps no state: its position is the stream's batch counter, which the
    # loader state stores (round trip: tests/data_pipelines/test_loader_resume.py).
    uninterrupted = draws(sampler(seed=7), range(300))
    assert draws(sampler(seed=7), range(123)) + draws(sampler(seed=7), range(123, 300)) == uninterrupted


@pytest.mark.parametrize(
    "strategy, kwargs, message",
    [
        ("roundrobin", {}, "unknown sampling strategy 'roundrobin'"),
        ("fixed", {"fixed": {"coco": 1.0}}, "needs a weight for every source"),
        ("temperature", {"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_strategy_arguments_raise(strategy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        strategy_weights(strategy, num_samples=SIZES, **kwargs)


def test_non_positive_weight_and_unknown_composition_raise():
    with pytest.raises(ValueError, match="must be > 0"):
        TaskSampler({"coco": 1.0, "ade": 0.0}, strategy="fixed", composition="mixed", batch_size=1, seed=0,
                    readers_per_rank=1)
    with pytest.raises(ValueError, match="unknown batch composition"):
        TaskSampler({"coco": 1.0}, strategy="uniform", composition="per_task", batch_size=1, seed=0, readers_per_rank=1)
