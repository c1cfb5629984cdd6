"""Loss balancers: the contract every registered method keeps, then each method against
its paper's definition on small hand-made gradient sets (float64)."""
import copy
import math

import pytest
import torch

from trainer.balancers import Balancer, balancer_names, build_balancer, register_balancer
from trainer.balancers.aligned_mtl import alignment
from trainer.balancers.mgda import min_norm_exact, min_norm_frank_wolfe
from trainer.balancers.pcgrad import projection_orders
from trainer.checkpoint import read_dcp, write_dcp

TASKS = ["det", "mask", "kp", "sem", "cls"]
F64 = torch.float64


def _steps(num_steps: int, *, seed: int = 0, dim: int = 12):
    """Random (G, losses, present) steps; the third task is absent every other step."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(num_steps):
        grads = torch.randn(len(TASKS), dim, generator=gen, dtype=F64)
        losses = torch.rand(len(TASKS), generator=gen, dtype=F64) + 0.5
        present = torch.ones(len(TASKS), dtype=torch.bool)
        if k % 2:
            present[2] = False
            grads[2], losses[2] = 0.0, 0.0  # what the global statistics hold for an absent task
        yield grads, losses, present


# --- the contract, for every registered balancer ----------------------------------------------

@pytest.mark.parametrize("name", balancer_names())
def test_shape_dtype_and_device_follow_the_losses(name):
    grads, losses, _ = next(_steps(1))
    for dtype in (torch.float32, F64):
        coef = build_balancer(name, TASKS).coefficients((grads @ grads.T).to(dtype), losses.to(dtype))
        assert coef.shape == (len(TASKS),) and coef.dtype == dtype and coef.device == losses.device
        assert torch.isfinite(coef).all()


@pytest.mark.parametrize("name", balancer_names())
def test_same_inputs_give_bit_identical_coefficients(name):
    first, second = build_balancer(name, TASKS), build_balancer(name, TASKS)
    for grads, losses, present in _steps(6):
        gram = grads @ grads.T
        assert torch.equal(first.coefficients(gram, losses, present=present),
                           second.coefficients(gram.clone(), losses.clone(), present=present.clone()))


@pytest.mark.parametrize("name", balancer_names())
def test_absent_tasks_get_zero_and_do_not_poison_the_others(name):
    grads, losses, _ = next(_steps(1))
    present = torch.tensor([True, True, False, True, True])
    clean_grads, clean_losses = grads.clone(), losses.clone()
    clean_grads[2], clean_losses[2] = 0.0, 0.0
    poisoned_losses = clean_losses.clone()
    poisoned_losses[2] = 1e6
    poisoned_gram = clean_grads @ clean_grads.T
    poisoned_gram[2, :] = poisoned_gram[:, 2] = -3.0
    poisoned_gram[2, 2] = 50.0
    clean = build_balancer(name, TASKS).coefficients(clean_grads @ clean_grads.T, clean_losses, present=present)
    poisoned = build_balancer(name, TASKS).coefficients(poisoned_gram, poisoned_losses, present=present)
    assert clean[2] == 0 and poisoned[2] == 0
    assert torch.equal(clean, poisoned)
    nobody = build_balancer(name, TASKS).coefficients(clean_grads @ clean_grads.T, clean_losses,
                                                      present=torch.zeros(len(TASKS), dtype=torch.bool))
    assert torch.equal(nobody, torch.zeros(len(TASKS), dtype=F64))


@pytest.mark.parametrize("name", balancer_names())
def test_combine_equals_coefficients_times_gradients(name):
    balancer = build_balancer(name, TASKS)
    for grads, losses, present in _steps(4):
        twin = copy.deepcopy(balancer)
        combined = balancer.combine(grads, losses, present=present)
        expected = twin.coefficients(grads @ grads.T, losses, present=present) @ grads
        assert torch.equal(combined, expected)


@pytest.mark.parametrize("name", balancer_names())
def test_state_round_trip_continues_identically(name, tmp_path):
    steps = list(_steps(8, seed=1))
    uninterrupted = build_balancer(name, TASKS)
    for grads, losses, present in steps[:4]:
        uninterrupted.coefficients(grads @ grads.T, losses, present=present)
    saved = uninterrupted.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float, list)) for v in saved.values())
    torch.save(saved, tmp_path / "state.pt")
    resumed = build_balancer(name, TASKS)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for grads, losses, present in steps[4:]:
        gram = grads @ grads.T
        assert torch.equal(uninterrupted.coefficients(gram, losses, present=present),
                           resumed.coefficients(gram, losses, present=present))
    assert uninterrupted.monitor() == resumed.monitor()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, no group
@pytest.mark.parametrize("name", balancer_names())
def test_state_goes_through_the_trainers_dcp_checkpoint(name, tmp_path):
    trained = build_balancer(name, TASKS)
    for grads, losses, present in _steps(3, seed=2):
        trained.coefficients(grads @ grads.T, losses, present=present)
    write_dcp({"balancer": trained.state_dict()}, tmp_path / "ckpt")
    target = {"balancer": build_balancer(name, TASKS).state_dict()}
    read_dcp(target, tmp_path / "ckpt")
    resumed = build_balancer(name, TASKS)
    resumed.load_state_dict(target["balancer"])
    grads, losses, present = next(_steps(1, seed=3))
    assert torch.equal(trained.coefficients(grads @ grads.T, losses, present=present),
                       resumed.coefficients(grads @ grads.T, losses, present=present))


@pytest.mark.parametrize("name", balancer_names())
def test_degenerate_gradient_sets_give_finite_coefficients(name):
    """A present task with a zero gradient, duplicated gradients, more tasks than dimensions,
    gradients whose hull holds 0: exactly singular sub-problems for the solvers."""
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [-1.0, 0.5], [0.3, -2.0]], dtype=F64)
    for grads in (g, g[:2], g[[0, 3]], -g[[0, 0, 0, 0, 0]]):
        tasks = TASKS[: len(grads)]
        coef = build_balancer(name, tasks).coefficients(grads @ grads.T, torch.ones(len(tasks), dtype=F64))
        assert torch.isfinite(coef).all(), (name, grads, coef)


def test_state_of_other_tasks_is_refused():
    state = build_balancer("uncertainty", TASKS).state_dict()
    with pytest.raises(ValueError, match="tasks"):
        build_balancer("uncertainty", TASKS[:4]).load_state_dict(state)


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_balancer("equal")(type("Again", (Balancer,), {"_solve": lambda self, g, l, p: l}))
    with pytest.raises(ValueError, match="no balancer"):
        build_balancer("nope", TASKS)
    with pytest.raises(ValueError, match="unknown option"):
        build_balancer("cagrad", TASKS, alpha=0.5)
    with pytest.raises(ValueError, match="Gram"):
        build_balancer("mgda", TASKS).coefficients(None, torch.ones(len(TASKS)))
    with pytest.raises(ValueError, match="non-finite"):
        build_balancer("equal", TASKS).coefficients(None, torch.tensor([1.0, float("nan"), 1, 1, 1]))


def test_loss_based_methods_need_no_gram():
    for name in balancer_names():
        balancer = build_balancer(name, TASKS)
        if not balancer.needs_gram:
            assert torch.isfinite(balancer.coefficients(None, torch.ones(len(TASKS)))).all()
    assert {n for n in balancer_names() if not build_balancer(n, TASKS).needs_gram} == {
        "equal", "static", "uncertainty", "dwa", "famo"}


# --- each method against its definition -------------------------------------------------------

def test_equal_and_static_weights():
    losses = torch.ones(3, dtype=F64)
    present = torch.tensor([True, False, True])
    assert build_balancer("equal", ["a", "b", "c"]).coefficients(None, losses, present=present).tolist() == [1, 0, 1]
    static = build_balancer("static", ["a", "b", "c"], weights={"a": 2.0, "b": 3.0})
    assert static.coefficients(None, losses, present=present).tolist() == [2, 0, 1]


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_mgda_two_vectors_min_norm_point_of_their_segment(solver):
    g1, g2 = torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64)
    grads = torch.stack([g1, g2])
    # Sener & Koltun, Algorithm 1: γ = clip((g2 - g1)·g2 / ‖g1 - g2‖², 0, 1) on g1.
    gamma = min(1.0, max(0.0, float((g2 - g1) @ g2 / (g1 - g2).square().sum())))
    balancer = build_balancer("mgda", ["a", "b"], solver=solver, tol=1e-12, max_iter=10_000)
    coef = balancer.coefficients(grads @ grads.T, torch.ones(2, dtype=F64))
    assert torch.allclose(coef, torch.tensor([gamma, 1 - gamma], dtype=F64), atol=1e-9)
    # A dominated pair: the shorter vector itself is the min-norm point.
    short = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.5])]).double()
    coef = build_balancer("mgda", ["a", "b"], solver=solver).coefficients(short @ short.T, torch.ones(2, dtype=F64))
    assert coef.tolist() == [1.0, 0.0]


def test_mgda_exact_satisfies_kkt_and_frank_wolfe_approaches_it():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(5, 4, generator=gen, dtype=F64)  # rank-deficient: T > D
    gram = grads @ grads.T
    alpha = min_norm_exact(gram)
    value = alpha @ gram @ alpha
    # KKT of min αᵀKα on the simplex: (Kα)_i >= αᵀKα, with equality where α_i > 0.
    assert abs(float(alpha.sum()) - 1) < 1e-12 and (alpha >= 0).all()
    assert (gram @ alpha >= value - 1e-10).all()
    assert torch.allclose((gram @ alpha)[alpha > 1e-9], value.expand(int((alpha > 1e-9).sum())), atol=1e-10)
    # Frank-Wolfe converges sublinearly (hence the exact solver by default for small T).
    fw = min_norm_frank_wolfe(gram, 20_000, 1e-12)
    assert value <= fw @ gram @ fw <= 1.01 * value
    # Orthonormal gradients: the barycentre.
    assert torch.allclose(min_norm_exact(torch.eye(3, dtype=F64)), torch.full((3,), 1 / 3, dtype=F64))


def test_mgda_zero_in_the_hull_gives_a_zero_direction():
    grads = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]], dtype=F64)
    combined = build_balancer("mgda", ["a", "b", "c"]).combine(grads, torch.ones(3, dtype=F64))
    assert torch.equal(combined, torch.zeros(2, dtype=F64))


def test_mgda_normalization_maps_coefficients_back_to_raw_gradients():
    grads = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=F64)
    coef = build_balancer("mgda", ["a", "b"], normalization="l2").coefficients(grads @ grads.T, torch.ones(2, dtype=F64))
    # Unit vectors e1, e2: min-norm point ½e1 + ½e2 = (½/4) g1 + (½/1) g2.
    assert torch.allclose(coef, torch.tensor([0.125, 0.5], dtype=F64))


def _pcgrad_reference(grads, orders):
    """Yu et al., Algorithm 1, on explicit vectors."""
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def test_pcgrad_two_conflicting_vectors():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    # g1 - (g1·g2/‖g2‖²) g2 = (½, ½); g2 - (g1·g2/‖g1‖²) g1 = (0, 1).
    combined = build_balancer("pcgrad", ["a", "b"]).combine(grads, torch.ones(2, dtype=F64))
    assert torch.allclose(combined, torch.tensor([0.5, 1.5], dtype=F64))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    assert torch.equal(build_balancer("pcgrad", ["a", "b"]).combine(agreeing, torch.ones(2, dtype=F64)), agreeing.sum(0))


def test_pcgrad_equals_sequential_projection_with_the_seeded_orders():
    balancer = build_balancer("pcgrad", TASKS, seed=7)
    gen = torch.Generator().manual_seed(11)
    for step in range(6):
        grads = torch.randn(len(TASKS), 3, generator=gen, dtype=F64)  # 5 vectors in 3-d: many conflicts
        expected = _pcgrad_reference(grads, projection_orders(len(TASKS), seed=7, step=step))
        assert torch.allclose(balancer.combine(grads, torch.ones(len(TASKS), dtype=F64)), expected, atol=1e-12)
    orders = [projection_orders(5, seed=7, step=s) for s in range(6)]
    assert len({str(o) for o in orders}) > 1  # the order does change from step to step


def test_uncertainty_fixed_point_is_the_log_loss():
    losses = torch.tensor([0.2, 1.0, 5.0], dtype=F64)
    balancer = build_balancer("uncertainty", ["a", "b", "c"])
    # ∂/∂s ½(e^{-s} L + s) = 0 at s = log L: coefficient ½ e^{-s} = 1/(2L), and s stays there.
    balancer.state["log_var"] = losses.log()
    coef = balancer.coefficients(None, losses)
    assert torch.allclose(coef, 0.5 / losses, rtol=1e-12)
    assert torch.allclose(balancer.state["log_var"], losses.log(), atol=1e-9)
    # From s = 0 the balancer's own steps converge there.
    fresh = build_balancer("uncertainty", ["a", "b", "c"], lr=0.05)
    for _ in range(1500):
        coef = fresh.coefficients(None, losses)
    assert torch.allclose(coef * losses, torch.full((3,), 0.5, dtype=F64), atol=1e-3)


def test_dwa_constant_losses_give_equal_weights():
    balancer = build_balancer("dwa", ["a", "b", "c"], window=3)
    for _ in range(20):
        assert torch.equal(balancer.coefficients(None, torch.tensor([3.0, 0.5, 1.0], dtype=F64)), torch.ones(3, dtype=F64))


def test_dwa_weights_from_the_ratio_of_the_last_two_windows():
    balancer = build_balancer("dwa", ["a", "b"], window=2, temperature=2.0)
    coefs = [balancer.coefficients(None, torch.tensor([4.0 / 2 ** (k // 2), 1.0], dtype=F64)) for k in range(6)]
    assert all(torch.equal(c, torch.ones(2, dtype=F64)) for c in coefs[:4])  # first two windows: λ = 1
    # a halves from window to window, b is constant: w = (½, 1), λ = 2 softmax(w / 2).
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0], dtype=F64) / 2, dim=0)
    assert torch.allclose(coefs[4], expected) and torch.equal(coefs[4], coefs[5])


def test_famo_equal_loss_decrease_keeps_equal_weights():
    # γ = 0: with decay, Adam (as in the authors' code) would blow rounding-level logits up to
    # steps of size ~lr; the direction z ⊙ (δ - zᵀδ) itself is what must vanish.
    balancer = build_balancer("famo", ["a", "b", "c"], gamma=0.0)
    base = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    for k in range(10):
        losses = base * 0.9**k
        coef = balancer.coefficients(None, losses)
        assert torch.allclose(balancer.state["logits"], torch.zeros(3, dtype=F64), atol=1e-9)
        # z uniform: c_i = (1/L_i) / Σ_j 1/L_j — every task's log-loss equally weighted.
        assert torch.allclose(coef, (1 / losses) / (1 / losses).sum())


def test_famo_upweights_the_task_that_decreased_less_and_explicit_mode_matches():
    before, after = torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([0.5, 0.9], dtype=F64)
    auto = build_balancer("famo", ["a", "b"])
    auto.coefficients(None, before)
    auto_coef = auto.coefficients(None, after)
    logits = auto.state["logits"]
    assert logits[1] > logits[0]
    explicit = build_balancer("famo", ["a", "b"], loss_change="explicit")
    explicit.coefficients(None, before)
    explicit.update(before, after)
    assert torch.equal(explicit.coefficients(None, after), auto_coef)
    with pytest.raises(RuntimeError):
        auto.update(before, after)


def test_gradnorm_alpha_zero_fixed_point_equalises_weighted_norms():
    # ‖g‖ = 1, 2, 4 and w ∝ 1/‖g‖ summing to T: every w_i‖g_i‖ equal (exactly, powers of two).
    gram = torch.diag(torch.tensor([1.0, 4.0, 16.0], dtype=F64))
    balancer = build_balancer("gradnorm", ["a", "b", "c"], alpha=0.0)
    balancer.state["weights"] = 3 * torch.tensor([4.0, 2.0, 1.0], dtype=F64) / 7
    weights = balancer.state["weights"].clone()
    for _ in range(5):
        coef = balancer.coefficients(gram, torch.ones(3, dtype=F64))
        assert torch.equal(balancer.state["weights"], weights)  # any Adam step would move it by ~lr
        assert torch.allclose(coef, weights, rtol=1e-15)  # Σ w = 3 up to an ulp
    # From equal weights the steps move towards it, keeping Σ w = T.
    fresh = build_balancer("gradnorm", ["a", "b", "c"], alpha=0.0)
    spread = []
    for _ in range(200):
        coef = fresh.coefficients(gram, torch.ones(3, dtype=F64))
        scaled = coef * gram.diagonal().sqrt()
        spread.append(float(scaled.max() / scaled.min()))
    assert spread[0] == 4.0 and spread[-1] < 1.1
    assert abs(float(fresh.state["weights"].sum()) - 3) < 1e-12


def test_gradnorm_alpha_favours_the_slower_task():
    balancer = build_balancer("gradnorm", ["a", "b"], alpha=1.5)
    gram = torch.eye(2, dtype=F64)
    balancer.coefficients(gram, torch.tensor([1.0, 1.0], dtype=F64))  # records L(0)
    balancer.coefficients(gram, torch.tensor([0.2, 0.9], dtype=F64))  # b trains slower
    weights = balancer.state["weights"]
    assert weights[1] > weights[0] and abs(float(weights.sum()) - 2) < 1e-12


def test_cagrad_c_zero_is_the_mean_gradient():
    grads, losses, present = next(_steps(1))
    coef = build_balancer("cagrad", TASKS, c=0.0).coefficients(grads @ grads.T, losses, present=present)
    assert torch.equal(coef, torch.full((len(TASKS),), 1 / len(TASKS), dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 4, generator=gen, dtype=F64)
    c = 0.4
    d = build_balancer("cagrad", ["a", "b", "c"], c=c).combine(grads, torch.ones(3, dtype=F64)) * (1 + c**2)
    g0 = grads.mean(dim=0)
    radius = c * g0.norm()
    # Liu et al.'s primal problem: d = argmax_{‖d - g0‖ <= c‖g0‖} min_i g_i·d, attained on the sphere.
    assert abs(float((d - g0).norm() - radius)) < 1e-9
    directions = torch.randn(200_000, 4, generator=gen, dtype=F64)
    others = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    assert float((grads @ d).min()) >= float((others @ grads.T).min(dim=1).values.max()) - 1e-9


def test_imtl_g_gives_equal_projections_on_every_task_direction():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 10, generator=gen, dtype=F64)
    coef = build_balancer("imtl_g", list("abcd")).coefficients(grads @ grads.T, torch.ones(4, dtype=F64))
    d = coef @ grads
    projections = grads @ d / grads.norm(dim=1)
    assert abs(float(coef.sum()) - 1) < 1e-12
    assert torch.allclose(projections, projections[0].expand(4), rtol=1e-10)
    # Two tasks: equal projections put d on the bisector of the unit gradients.
    two = torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=F64)
    d = build_balancer("imtl_g", ["a", "b"]).combine(two, torch.ones(2, dtype=F64))
    bisector = two[0] / two[0].norm() + two[1] / two[1].norm()
    assert abs(float(d[0] * bisector[1] - d[1] * bisector[0])) < 1e-12


def test_nash_mtl_solves_its_bargaining_equation():
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(5, 9, generator=gen, dtype=F64) * torch.tensor([1e-3, 1.0, 10.0, 1.0, 0.1], dtype=F64)[:, None]
    gram = grads @ grads.T
    alpha = build_balancer("nash_mtl", TASKS).coefficients(gram, torch.ones(5, dtype=F64))
    assert (alpha > 0).all()
    # Gᵀ G α = 1/α (Navon et al., Algorithm 1), up to the 1e-10 relative ridge.
    assert torch.allclose(gram @ alpha, 1 / alpha, rtol=1e-8)
    orthogonal = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
    alpha = build_balancer("nash_mtl", ["a", "b"], ridge=0.0).coefficients(orthogonal, torch.ones(2, dtype=F64))
    assert torch.allclose(alpha, torch.tensor([0.5, 2.0], dtype=F64), rtol=1e-14)  # α_i = 1/‖g_i‖


def test_nash_mtl_weights_satisfy_the_reference_implementations_constraint_unscaled():
    """The reference (Navon et al., methods/weight_methods.py) normalises K by n = ‖K‖_F but
    constrains log(α_i·n) + log(((K/n) α)_i) >= 0, active at its solution: n cancels, so its
    weights are ours, not √n times ours (what this module's comment once claimed)."""
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(4, 7, generator=gen, dtype=F64) * torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=F64)[:, None]
    gram = grads @ grads.T
    n = float(torch.linalg.matrix_norm(gram))
    assert abs(n - 1) > 1  # a scale at which a √n factor shows

    def reference_constraint(alpha: torch.Tensor) -> torch.Tensor:
        return torch.log(alpha * n) + torch.log((gram / n) @ alpha)

    alpha = build_balancer("nash_mtl", ["a", "b", "c", "d"], ridge=0.0).coefficients(gram, torch.ones(4, dtype=F64))
    assert torch.allclose(reference_constraint(alpha), torch.zeros(4, dtype=F64), atol=1e-9)
    assert reference_constraint(alpha * n**0.5).abs().min() > 0.1  # the claimed rescaling is not a solution


def test_aligned_mtl_equalises_the_singular_values():
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(4, 8, generator=gen, dtype=F64) * torch.tensor([5.0, 1.0, 0.2, 1.0], dtype=F64)[:, None]
    gram = grads @ grads.T
    b = alignment(gram, "min")
    aligned_gram = b @ gram @ b  # Gram of the aligned gradients Bᵀ G
    assert torch.allclose(torch.linalg.eigvalsh(aligned_gram), torch.linalg.eigvalsh(gram).min().expand(4), rtol=1e-9)
    coef = build_balancer("aligned_mtl", list("abcd")).coefficients(gram, torch.ones(4, dtype=F64))
    assert torch.allclose(coef, b.sum(dim=1))
    # Orthogonal gradients: each is rescaled to the smallest norm.
    orthogonal = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=F64))
    coef = build_balancer("aligned_mtl", list("abc")).coefficients(orthogonal, torch.ones(3, dtype=F64))
    assert torch.allclose(coef, torch.tensor([0.25, 0.5, 1.0], dtype=F64))


def test_paper_defaults():
    assert build_balancer("cagrad", TASKS).c == 0.4
    assert build_balancer("gradnorm", TASKS).alpha == 1.5
    assert build_balancer("dwa", TASKS).temperature == 2.0
    famo = build_balancer("famo", TASKS)
    assert (famo.adam.lr, famo.adam.weight_decay) == (0.025, 0.01)
    mgda = build_balancer("mgda", TASKS)
    assert (mgda.max_iter, mgda.tol, mgda.normalization) == (250, 1e-5, "none")
    assert build_balancer("aligned_mtl", TASKS).scale == "min"
    assert math.isclose(build_balancer("uncertainty", TASKS).coefficients(None, torch.ones(5))[0].item(), 0.5)
