"""One path and one source of truth for loss weights: a static balancer is just a balancer
whose coefficients are fixed; a setting that would be ignored is an error naming both keys."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO
from trainer.balancers import balancer_names, build_balancer
from trainer.balancing import LossBalancing
from trainer.config import BalancerConfig
from trainer.config import load_config
from trainer.config_loading import ConfigError

DEMO = REPO / "configs" / "demo_cpu.yaml"


@pytest.mark.parametrize("overrides, keys", [
    (["trainer.loss_weights.detection=2", "balancer.name=famo"], ["trainer.loss_weights", "balancer.name"]),
    (["balancer.options.weights.detection=2"], ["balancer.options.weights", "trainer.loss_weights"]),
    (["balancer.name=equal", "balancer.statistics=parameters"], ["balancer.statistics", "balancer.name"]),
    (["balancer.name=famo", "balancer.statistics=parameters"], ["balancer.statistics", "balancer.name"]),
    (["balancer.name=famo", "trainer.grad_accum_steps=2"], ["balancer.name", "trainer.grad_accum_steps"]),
])
def test_a_setting_that_would_be_ignored_is_an_error_naming_both_keys(overrides, keys):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    for key in keys:
        assert key in str(info.value), (key, str(info.value))


@pytest.mark.parametrize("name", ["static", "equal"])
def test_fixed_balancers_accept_gradient_accumulation(name):
    cfg = load_config(DEMO, [f"balancer.name={name}", "trainer.grad_accum_steps=2"])
    assert cfg.balancer.fixed and cfg.trainer.grad_accum_steps == 2


def test_fixed_coefficients_are_the_static_weights_or_ones():
    tasks = ["a", "b", "c"]
    static = LossBalancing(BalancerConfig(name="static"), tasks, static_weights={"b": 0.25}, world_size=1)
    assert static.fixed and static.fixed_coefficients(torch.device("cpu")).tolist() == [1.0, 0.25, 1.0]
    equal = LossBalancing(BalancerConfig(name="equal"), tasks, static_weights={}, world_size=1)
    assert equal.fixed and equal.fixed_coefficients(torch.device("cpu")).tolist() == [1.0, 1.0, 1.0]
    assert {n for n in balancer_names() if build_balancer(n, tasks).fixed} == {"static", "equal"}
    with pytest.raises(ValueError, match="famo: coefficients depend on each step"):
        build_balancer("famo", tasks).fixed_coefficients()
