"""torchrun worker: every balancer gives bit-identical coefficients on all ranks from the
reduced statistics, although each rank holds a different local batch and rank 1 never
holds a sample of task "c" (and in one step no rank holds a sample of task "b").

Representation mode, as the trainer runs it: heads on the detached features, per-task
gradients w.r.t. them, local Gram matrix, one all-reduce. The global statistics must
equal those of the whole global batch in one process, and the trunk gradient that DDP
would average must equal Σ c_i ∇L_i of the global mean losses.
"""
import torch
import torch.distributed as dist

from trainer.balancers import balancer_names, build_balancer
from trainer.grad_stats import (
    combine_task_gradients,
    detached_features,
    gram_matrix,
    reduce_statistics,
    task_gradients_wrt,
)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2
TASKS = ["a", "b", "c"]
BATCH, OWNED = 8, [range(0, 5), range(5, 8)]  # uneven local batches

torch.manual_seed(0)  # same trunk and heads on every rank
trunk = torch.nn.Linear(6, 4)
heads = torch.randn(len(TASKS), 4)
balancers = {name: build_balancer(name, TASKS) for name in balancer_names()}


def labelled(step: int) -> torch.Tensor:
    """[BATCH, T]: a everywhere; b on samples 1 and 6, except at step 2 (absent globally);
    c on samples 0, 2, 3 only, all on rank 0."""
    mask = torch.zeros(BATCH, len(TASKS), dtype=torch.bool)
    mask[:, 0] = True
    if step != 2:
        mask[[1, 6], 1] = True
    mask[[0, 2, 3], 2] = True
    return mask


def per_sample_losses(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T] squared errors of the linear heads on tanh features."""
    return (torch.tanh(z) @ heads.T - targets) ** 2


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


for step in range(5):
    gen = torch.Generator().manual_seed(100 + step)  # the global batch, known to every rank
    x, targets, mask = torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, len(TASKS), generator=gen), labelled(step)
    mine = list(OWNED[rank])

    # --- this rank, representation mode ---
    z = trunk(x[mine])
    (zd,) = detached_features({"z": z}).values()
    losses = per_sample_losses(zd, targets[mine])
    local_mask = mask[mine]
    sums = {t: (losses[:, i] * local_mask[:, i]).sum() for i, t in enumerate(TASKS)}
    counts = local_mask.sum(dim=0)
    grads = task_gradients_wrt([zd], sums, TASKS, skip=(counts == 0).tolist())
    if rank == 1:
        assert grads[2] is None  # rank 1 never holds task c
    stats = reduce_statistics(gram_matrix(grads), torch.stack(list(sums.values())).detach(), counts.float(),
                              world_size=world)

    # --- the whole global batch in one process ---
    z_all = trunk(x)
    all_losses = per_sample_losses(z_all, targets)
    present = mask.any(dim=0)
    means = [(all_losses[:, i] * mask[:, i]).sum() / mask[:, i].sum().clamp(min=1) for i in range(len(TASKS))]
    ref_grads = torch.stack([
        torch.autograd.grad(m, z_all, retain_graph=True)[0].reshape(-1) if present[i] else torch.zeros(z_all.numel())
        for i, m in enumerate(means)
    ]).double()
    assert torch.equal(stats.present, present), (stats.present, present)
    assert torch.allclose(stats.gram, ref_grads @ ref_grads.T, rtol=1e-5, atol=1e-8), (stats.gram, ref_grads @ ref_grads.T)
    assert torch.allclose(stats.losses, torch.stack(means).double().detach(), rtol=1e-6)
    assert all(torch.equal(g, stats.gram) for g in gathered(stats.gram))

    for name, balancer in balancers.items():
        coef = balancer.coefficients(stats.gram, stats.losses, present=stats.present)
        others = gathered(coef)
        assert all(torch.equal(c, coef) for c in others), (name, step, others)
        assert bool((coef[~present] == 0).all()), (name, coef)

        # The trunk gradient DDP would average equals the big-batch Σ c_i ∇L_i.
        trunk.zero_grad()
        weights = stats.rank_weights(coef, world_size=world)
        (combined,) = combine_task_gradients(grads, weights, like=[zd])
        z.backward(combined, retain_graph=True)
        averaged = trunk.weight.grad.clone()
        dist.all_reduce(averaged)
        averaged /= world
        total = sum(float(coef[i]) * means[i] for i in range(len(TASKS)) if present[i])
        expected = torch.autograd.grad(total, trunk.weight, retain_graph=True)[0]
        assert torch.allclose(averaged, expected, rtol=1e-4, atol=1e-6), (name, averaged, expected)

print(f"rank {rank} ok")
dist.destroy_process_group()
