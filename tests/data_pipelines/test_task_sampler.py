from collections import Counter

import pytest

from data_pipelines.task_sampler import TaskSampler, strategy_weights

SIZES = {"coco": 100, "ade": 300, "imagenet": 600}


def draws(sampler: TaskSampler, n: int) -> list[str]:
    return [sampler.sample() for _ in range(n)]


def test_same_seed_same_sequence_other_seed_differs():
    weights = strategy_weights("proportional", num_samples=SIZES)
    a = draws(TaskSampler(weights, seed=3), 500)
    assert a == draws(TaskSampler(weights, seed=3), 500)
    assert a != draws(TaskSampler(weights, seed=4), 500)


@pytest.mark.parametrize(
    "strategy, kwargs, target",
    [
        ("proportional", {}, [0.1, 0.3, 0.6]),
        ("uniform", {}, [1 / 3, 1 / 3, 1 / 3]),
        ("fixed", {"fixed": {"coco": 1.0, "ade": 1.0, "imagenet": 2.0}}, [0.25, 0.25, 0.5]),
        # n^(1/2): 10, 17.32, 24.49
        ("temperature", {"temperature": 2.0}, [10 / 51.815, 17.3205 / 51.815, 24.4949 / 51.815]),
    ],
)
def test_realised_mix_approaches_target(strategy, kwargs, target):
    sampler = TaskSampler(strategy_weights(strategy, num_samples=SIZES, **kwargs), seed=0)
    assert list(sampler.probabilities.values()) == pytest.approx(target, abs=1e-4)
    n = 20_000
    counts = Counter(draws(sampler, n))
    for name, p in zip(SIZES, target):
        assert counts[name] / n == pytest.approx(p, abs=0.015), name


def test_state_dict_round_trip_continues_the_sequence():
    weights = strategy_weights("uniform", num_samples=SIZES)
    sampler = TaskSampler(weights, seed=7)
    draws(sampler, 123)
    state = sampler.state_dict()
    expected = draws(sampler, 200)

    resumed = TaskSampler(weights, seed=0)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert draws(resumed, 200) == expected


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


def test_non_positive_weight_raises():
    with pytest.raises(ValueError, match="must be > 0"):
        TaskSampler({"coco": 1.0, "ade": 0.0}, seed=0)
