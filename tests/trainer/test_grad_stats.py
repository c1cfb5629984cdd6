"""Per-task gradient statistics: gradients w.r.t. the representation or the shared
parameters, their Gram matrix, the global reduction; the two modes agree on a linear trunk."""
import pytest
import torch

from tests.conftest import SCRIPTS, run_torchrun
from trainer.balancers import balancer_names, build_balancer
from trainer.grad_stats import (
    combine_task_gradients,
    detached_features,
    gram_matrix,
    reduce_statistics,
    statistics_metrics,
    surrogate_loss,
    task_gradients_wrt,
)

F64 = torch.float64
TASKS = ["a", "b", "c"]


def _losses_on(z, heads, targets, mask):
    """Per-task sums of per-sample losses over the labelled samples (nonlinear heads)."""
    per_sample = (torch.tanh(z @ heads.T) - targets) ** 2
    return {t: (per_sample[:, i] * mask[:, i]).sum() for i, t in enumerate(TASKS)}


@pytest.mark.parametrize("orthonormal_inputs", [True, False])
def test_representation_and_parameters_modes_agree_on_a_linear_trunk(orthonormal_inputs):
    """z_s = W x_s: ∂L/∂W = Σ_s (∂L/∂z_s) x_sᵀ, so ⟨∂L_i/∂W, ∂L_j/∂W⟩ = Σ_{s,t} (a_s·b_t)(x_s·x_t),
    which is the representation Gram matrix Σ_s a_s·b_s when the inputs are orthonormal.
    Then every balancer gives the same coefficients and the trunk the same update; with
    general inputs only the loss-based ones must agree."""
    gen = torch.Generator().manual_seed(0)
    batch, width, dim = 5, 4, 8
    x = torch.eye(dim, dtype=F64)[:batch] if orthonormal_inputs else torch.randn(batch, dim, generator=gen, dtype=F64)
    weight = torch.randn(width, dim, generator=gen, dtype=F64, requires_grad=True)
    heads = torch.randn(len(TASKS), width, generator=gen, dtype=F64)
    targets = torch.randn(batch, len(TASKS), generator=gen, dtype=F64)
    mask = torch.ones(batch, len(TASKS), dtype=torch.bool)
    mask[3:, 1] = False
    mask[:, 2] = False  # task c: no labelled sample
    counts = mask.sum(dim=0).to(F64)
    skip = (counts == 0).tolist()

    z = x @ weight.T
    (zd,) = detached_features({"z": z}).values()
    rep_sums = _losses_on(zd, heads, targets, mask)
    rep_grads = task_gradients_wrt([zd], rep_sums, TASKS, skip=skip)
    par_sums = _losses_on(z, heads, targets, mask)
    par_grads = task_gradients_wrt([weight], par_sums, TASKS, skip=skip)
    assert rep_grads[2] is None and par_grads[2] is None

    loss_sums = torch.stack(list(rep_sums.values())).detach()
    rep = reduce_statistics(gram_matrix(rep_grads, dtype=F64), loss_sums, counts, world_size=1)
    par = reduce_statistics(gram_matrix(par_grads, dtype=F64), loss_sums, counts, world_size=1)
    assert torch.allclose(rep.gram, par.gram, rtol=1e-12) == orthonormal_inputs

    for name in balancer_names():
        rep_balancer, par_balancer = build_balancer(name, TASKS), build_balancer(name, TASKS)
        if rep_balancer.needs_gram and not orthonormal_inputs:
            continue
        rep_coef = rep_balancer.coefficients(rep.gram, rep.losses, present=rep.present)
        par_coef = par_balancer.coefficients(par.gram, par.losses, present=par.present)
        assert torch.allclose(rep_coef, par_coef, rtol=1e-9, atol=1e-12), name
        # representation mode: one trunk backward with Σ w_i ∂L_i/∂z
        weight.grad = None
        combined = combine_task_gradients(rep_grads, rep.rank_weights(rep_coef, world_size=1), like=[zd])
        surrogate_loss([z], combined).backward(retain_graph=True)
        # parameters mode: Σ w_i ∂L_i/∂W directly
        par_weights = par.rank_weights(par_coef, world_size=1)
        direct = sum(par_weights[i] * g[0] for i, g in enumerate(par_grads) if g is not None)
        assert torch.allclose(weight.grad, direct, rtol=1e-5, atol=1e-7), name  # combine is float32


def test_task_gradients_none_zero_and_skip():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    losses = {"uses_a": a.square().sum(), "uses_both": a.sum() * b.sum(), "constant": torch.tensor(2.0),
              "skipped": a.sum() * 0.0}
    grads = task_gradients_wrt([a, b], losses, list(losses), skip=[False, False, False, True])
    assert torch.equal(grads[0][0], 2 * a.detach()) and torch.equal(grads[0][1], torch.zeros(2))
    assert torch.allclose(grads[1][1], a.detach().sum().expand(2))
    assert grads[2] is None and grads[3] is None


def test_gram_matrix_is_the_product_of_the_flattened_gradients():
    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 3), (4,), (1, 2, 2)]
    grads = [[torch.randn(s, generator=gen) for s in shapes], None, [torch.randn(s, generator=gen) for s in shapes]]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) if g is not None else torch.zeros(14) for g in grads])
    gram = gram_matrix(grads)
    assert gram.dtype == torch.float32 and torch.equal(gram, gram.T)
    assert torch.allclose(gram, flat @ flat.T, rtol=1e-6)
    # bf16 gradients (autocast): accumulated in float32 from the bf16 values.
    bf16 = [[t.to(torch.bfloat16) for t in g] if g is not None else None for g in grads]
    flat16 = torch.stack([torch.cat([t.float().reshape(-1) for t in g]) if g is not None else torch.zeros(14) for g in bf16])
    assert torch.allclose(gram_matrix(bf16), flat16 @ flat16.T, rtol=1e-6)
    assert torch.equal(gram_matrix([None, None]), torch.zeros(2, 2))


def test_reduce_statistics_normalises_by_global_counts():
    # gradients of local loss sums: a = (2, 0) over 2 samples, b = (-3, 3) over 3, c absent
    grads = torch.tensor([[2.0, 0.0], [-3.0, 3.0], [0.0, 0.0]], dtype=F64)
    stats = reduce_statistics(grads @ grads.T, torch.tensor([4.0, 3.0, 0.0]), torch.tensor([2.0, 3.0, 0.0]), world_size=1)
    means = grads / torch.tensor([2.0, 3.0, 1.0], dtype=F64)[:, None]  # gradients of the mean losses
    assert torch.allclose(stats.gram, means @ means.T)
    assert stats.losses.tolist() == [2.0, 1.0, 0.0] and stats.present.tolist() == [True, True, False]
    assert torch.allclose(stats.norms, torch.tensor([1.0, 2**0.5, 0.0], dtype=F64))
    assert torch.allclose(stats.cosine, torch.tensor([[1, -(0.5**0.5), 0], [-(0.5**0.5), 1, 0], [0, 0, 0]], dtype=F64))
    assert float(stats.conflict_fraction) == 1.0  # one pair of nonzero gradients, conflicting
    assert torch.allclose(stats.rank_weights(torch.tensor([1.0, 1.0, 1.0]), world_size=2),
                          torch.tensor([1.0, 2 / 3, 0.0], dtype=F64))
    row = statistics_metrics(stats, TASKS, torch.tensor([0.5, 0.5, 0.0]))
    assert row["balancer/coef/a"] == 0.5 and row["balancer/conflict_fraction"] == 1.0
    assert abs(row["balancer/cos/a/b"] + 0.5**0.5) < 1e-12 and row["balancer/grad_norm/c"] == 0.0


def test_combine_task_gradients_keeps_the_feature_dtype():
    like = [torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)]
    grads = [[torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)], None]
    out = combine_task_gradients(grads, torch.tensor([0.5, 7.0]), like=like)
    assert [o.dtype for o in out] == [torch.bfloat16] * 2 and torch.equal(out[1], torch.full((3,), 0.5, dtype=torch.bfloat16))
    assert all(torch.equal(o, torch.zeros_like(o)) for o in combine_task_gradients([None, None], torch.ones(2), like=like))
    z = torch.randn(2, 2, dtype=torch.bfloat16, requires_grad=True)
    surrogate_loss([z], out[:1]).backward()
    assert torch.equal(z.grad, out[0])  # the surrogate back-propagates exactly the combined gradient


@pytest.mark.distributed
def test_coefficients_are_bit_identical_on_two_ranks():
    proc = run_torchrun([str(SCRIPTS / "balancer_ranks_worker.py")], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7])
def test_blocked_gradients_are_the_flat_ones_cut_into_padded_slices(blocks):
    from trainer.grad_stats import blocked_task_gradients, flat_task_gradients

    gen = torch.Generator().manual_seed(blocks)
    for shapes in ([(5, 7), (3,)], [(1,)], [(2,)], [(4, 4), (1,), (9,)]):  # P below, near and above blocks
        like = [torch.zeros(s) for s in shapes]
        grads = [[torch.randn(s, generator=gen) for s in shapes], None, [torch.randn(s, generator=gen) for s in shapes]]
        flat = flat_task_gradients(grads, like, dtype=torch.float64)
        got = blocked_task_gradients(grads, like, blocks=blocks, dtype=torch.float64)
        chunk = got.shape[-1]
        assert chunk == -(-flat.shape[1] // blocks)
        padded = torch.nn.functional.pad(flat, (0, chunk * blocks - flat.shape[1]))
        assert torch.equal(got, padded.reshape(len(grads), blocks, chunk).transpose(0, 1)), shapes
