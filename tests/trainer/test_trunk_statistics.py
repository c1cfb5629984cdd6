"""Gradient statistics at a cut in the shared trunk, exact over the global batch (issue 19).

The 2-rank worker (tests/scripts/trunk_statistics_worker.py) runs LossBalancing as the
trainer does on a float64 ResNet-18-FPN, with two sources that label disjoint images and
two tasks that conflict only through the shared trunk, and compares every mode with one
process holding the whole global batch."""
import json

import pytest
import torch

from tests.conftest import SCRIPTS, run_torchrun
from trainer.config import BalancerConfig
from trainer.config import load_config
from trainer.config_loading import ConfigError
from trainer.grad_stats import CountSketch


@pytest.fixture(scope="module")
def report() -> dict:
    proc = run_torchrun([str(SCRIPTS / "trunk_statistics_worker.py")], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["fpn/exact", "layer4/exact", "parameters/exact", "features/exact"])
def test_two_ranks_give_the_global_batch_statistics_and_update_to_round_off(report, mode):
    r = report[mode]
    assert r["identical_on_ranks"]
    assert r["gram_error"] < 1e-12, r  # relative to the largest Gram entry, float64
    assert r["coef_error"] < 1e-10, r
    assert r["grad_error"] < 1e-10, r  # every trunk parameter, below and above the cut
    if mode != "features/exact":  # which datasets fight: the sources' parts of the update
        assert r["source_gram_error"] < 1e-12, r
        assert r["logged_source_cos"] == pytest.approx(r["source_cos"], abs=1e-12) and r["source_cos"] < -0.5


@pytest.mark.distributed
def test_a_cut_sees_the_cross_source_conflict_that_representation_space_cannot(report):
    # Tasks a and b are labelled on disjoint images and pull the shared features apart.
    assert report["features/exact"]["cos_ab"] == 0.0  # blind: disjoint rows of z
    for mode in ("fpn/exact", "layer4/exact", "parameters/exact"):
        assert report[mode]["cos_ab"] < -0.5, report[mode]
        assert report[mode]["cos_ab"] == pytest.approx(report[mode]["cos_ab_reference"], abs=1e-12)
    # Summing each rank's own Gram (the old parameters mode) misses the cross-rank terms.
    assert report["fpn/exact"]["summed_local_grams_error"] > 0.05


@pytest.mark.distributed
def test_both_gradient_exchanges_give_the_gram_of_the_summed_gradients(report):
    # all_to_all (the default on gloo) and reduce_scatter (elsewhere): both exact.
    assert report["exchange_errors"]["all_to_all"] < 1e-14, report["exchange_errors"]
    assert report["exchange_errors"]["reduce_scatter"] < 1e-14, report["exchange_errors"]


@pytest.mark.distributed
def test_the_sketch_stays_within_its_stated_error(report):
    r = report["fpn/sketch"]
    assert r["identical_on_ranks"]
    assert r["max_error_in_std"] < 5.0, r  # every entry within 5 standard deviations of the bound
    assert r["cos_ab"] == pytest.approx(r["cos_ab_reference"], abs=5 * (2 / 4096) ** 0.5)


def test_count_sketch_inner_products_are_unbiased_with_the_stated_variance():
    gen = torch.Generator().manual_seed(0)
    like = [torch.zeros(300), torch.zeros(20, 10)]
    a, b = torch.randn(500, generator=gen, dtype=torch.float64), torch.randn(500, generator=gen, dtype=torch.float64)
    b = b + 0.5 * a  # correlated
    grads = [[a[:300], a[300:].reshape(20, 10)], [b[:300], b[300:].reshape(20, 10)]]
    dim, exact = 64, float(a @ b)
    estimates = []
    for seed in range(400):
        s = CountSketch(like, dim=dim, seed=seed)(grads, like)
        estimates.append(float(s[0] @ s[1]))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    bound = ((a @ a) * (b @ b) + exact ** 2) / dim
    assert abs(float(estimates.mean()) - exact) < 4 * float(bound.sqrt()) / 400 ** 0.5  # unbiased
    assert float(estimates.var()) <= 1.2 * float(bound)  # variance within the stated bound
    assert float(estimates.var()) > 0.2 * float(bound)  # and the bound is not vacuous


@pytest.mark.parametrize("overrides, words", [
    (["balancer.mode=parameters"], ["balancer.mode", "renamed", "balancer.statistics"]),
    (["balancer.name=pcgrad", "balancer.statistics=neck"], ["balancer.statistics", "neck", "fpn"]),
    (["balancer.name=pcgrad", "balancer.statistics=features", "balancer.gram=sketch"], ["balancer.gram=sketch", "features"]),
    (["balancer.name=famo", "balancer.gram=sketch"], ["balancer.gram", "would be ignored"]),
    (["balancer.name=pcgrad", "balancer.statistics=fpn", "balancer.sketch_dim=64"], ["balancer.sketch_dim"]),
    (["balancer.name=pcgrad", "balancer.statistics=fpn", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"],
     ["balancer.name='pcgrad'", "ZeRO stage 3", "zero_stage=1 or 2"]),
    (["balancer.name=mgda", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"], ["ZeRO stage 3"]),
])
def test_statistics_settings_that_cannot_work_are_config_errors(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo_cpu.yaml", overrides)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_cut_statistics_work_with_zero_1_and_2():
    for stage in (1, 2):
        cfg = load_config("configs/demo_cpu.yaml", ["balancer.name=pcgrad", "balancer.statistics=fpn",
                                                    "trainer.backend=deepspeed", f"trainer.deepspeed.zero_stage={stage}"])
        assert isinstance(cfg.balancer, BalancerConfig) and cfg.balancer.statistics == "fpn"


def test_gradient_methods_take_their_statistics_at_the_fpn_unless_told_otherwise():
    assert load_config("configs/demo_cpu.yaml", ["balancer.name=pcgrad"]).balancer.where == "fpn"
    assert load_config("configs/demo_cpu.yaml", ["balancer.name=famo"]).balancer.where == "features"
    told = load_config("configs/demo_cpu.yaml", ["balancer.name=pcgrad", "balancer.statistics=features"])
    assert told.balancer.where == "features"
