"""torchrun worker (2 ranks): gradient statistics of shared trunk parameters are those of
the GLOBAL batch, cross-rank terms included, for every statistics mode of the trainer.

A float64 ResNet-18-FPN (the trainer's own backbone) and three linear heads on pooled
FPN features. Two sources label disjoint images: source A labels task "a", source B task
"b", both label "c"; the targets make "a" and "b" pull the shared features in opposite
directions, so the two tasks conflict only through the shared trunk. The ranks hold
uneven parts of the global batch. For each mode, LossBalancing (as the trainer runs it)
must give, on each rank, the Gram matrix and coefficients that one process computes on
the whole global batch, and after the backward pass the rank-averaged gradient of EVERY
trunk parameter (below and above the cut) must be Σ c_i ∇L_i of the global mean losses.

Prints one JSON line of measurements on rank 0 for the test to check.
"""
import json

import torch
import torch.distributed as dist

from models.backbone import build_backbone
from models.config import ModelConfig
from data_pipelines.schema import Batch
from models.multitask import GradientTaps, MultiTaskOutput
from models.trunk_cut import segment_parameters
from trainer.balancing import SKETCH_SEED, LossBalancing
from trainer.config import BalancerConfig
from trainer.grad_stats import (CountSketch, gram_matrix, reduce_statistics, shared_gram_partial, source_gram,
                                task_gradients_wrt)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2
torch.set_default_dtype(torch.float64)
TASKS = ["detection", "semantic", "classification"]  # "a", "b", "c" of the docstring
BATCH, OWNED = 6, [[0, 3], [1, 2, 4, 5]]  # uneven: rank 0 holds one image of each source
LABELLED = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 1], [0, 1, 1], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)
SOURCES = ["A", "A", "A", "B", "B", "B"]
SOURCE_TASKS = {"A": ["detection", "classification"], "B": ["semantic", "classification"]}
SKETCH_DIM = 4096

torch.manual_seed(0)  # same trunk and heads on every rank
trunk = build_backbone(ModelConfig(backbone="resnet18", fpn_channels=64, backbone_norm="group_norm")).double()
shared_direction = torch.randn(64) * 0.01  # small: the targets, not the features, set the sign
heads = torch.stack([shared_direction, shared_direction, torch.randn(64) * 0.01])  # a and b read the same feature
gen = torch.Generator().manual_seed(1)
images = torch.randn(BATCH, 3, 32, 32, generator=gen)
targets = torch.randn(BATCH, len(TASKS), generator=gen)
targets[:, 0] += 4.0  # task a wants the shared feature up, task b down
targets[:, 1] -= 4.0


def per_sample_losses(features: dict) -> torch.Tensor:
    pooled = sum(f.mean(dim=(2, 3)) for f in features.values())
    return ((pooled @ heads.T) - targets_now) ** 2


def local_output() -> tuple[MultiTaskOutput, Batch, torch.Tensor]:
    """This rank's forward as the model runs it for gradient methods: heads on z detached."""
    mine = OWNED[rank]
    z = trunk(images[mine])
    leaves = {k: v.detach().requires_grad_(True) for k, v in z.items()}
    losses, mask = per_sample_losses(leaves), LABELLED[mine]
    counts = mask.sum(dim=0)
    means = {t: (losses[:, i] * mask[:, i]).sum() / counts[i].clamp(min=1) for i, t in enumerate(TASKS)}
    task_mask = mask.bool()  # a column per task of the job (TASKS)
    batch = Batch(images=images[mine], targets=[{} for _ in mine], task_mask=task_mask,
                  sources=[SOURCES[b] for b in mine])
    return (MultiTaskOutput(losses=means, counts={t: int(c) for t, c in zip(TASKS, counts)}, features=z,
                            head_features=leaves, taps=GradientTaps(means, z)), batch, counts.double())


def global_reference(params: list, coefficients: torch.Tensor | None = None) -> tuple[list, torch.Tensor, torch.Tensor]:
    """One process, the whole global batch: the global mean losses, their Gram on ``params``
    and (given the coefficients) the Gram of the sources' parts of Σ c_i ∇L_i."""
    losses = per_sample_losses(trunk(images))
    means = [(losses[:, i] * LABELLED[:, i]).sum() / LABELLED[:, i].sum() for i in range(len(TASKS))]
    flat = lambda loss: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])  # noqa: E731
    grads = torch.stack([flat(m) for m in means])
    by_source = None
    if coefficients is not None:
        parts = []
        for src in SOURCE_TASKS:
            rows = torch.tensor([s == src for s in SOURCES])
            part = sum(float(coefficients[i]) * (losses[:, i] * (LABELLED[:, i] & rows)).sum() / LABELLED[:, i].sum()
                       for i in range(len(TASKS)))
            parts.append(flat(part))
        parts = torch.stack(parts)
        by_source = parts @ parts.T
    return means, grads @ grads.T, by_source


def all_equal(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(o, t) for o in out)


trainable = [p for p in trunk.parameters() if p.requires_grad]
report = {}
targets_now = targets[OWNED[rank]]
for statistics, gram_kind in [("fpn", "exact"), ("layer4", "exact"), ("parameters", "exact"), ("fpn", "sketch"),
                              ("features", "exact")]:
    cfg = BalancerConfig(name="pcgrad", statistics=statistics, gram=gram_kind,
                         sketch_dim=SKETCH_DIM if gram_kind == "sketch" else 1024)
    balancing = LossBalancing(cfg, TASKS, static_weights={}, world_size=world, source_tasks=SOURCE_TASKS)
    shared = segment_parameters(trunk, statistics) if statistics != "features" else None
    targets_now = targets[OWNED[rank]]
    trunk.zero_grad()
    out, batch, counts = local_output()
    step = balancing.balanced_loss(out, batch, counts, trunk=trunk, heads=torch.nn.Module())  # the heads: constants
    step.total.backward()
    averaged = [p.grad.clone() for p in trainable]
    for g in averaged:
        dist.all_reduce(g)
        g /= world

    targets_now = targets
    if shared is None:  # features: the Gram of ∂L_i/∂z over the global batch
        z = {k: v.detach().requires_grad_(True) for k, v in trunk(images).items()}
        losses = per_sample_losses(z)
        means = [(losses[:, i] * LABELLED[:, i]).sum() / LABELLED[:, i].sum() for i in range(len(TASKS))]
        zg = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(m, list(z.values()), retain_graph=True)])
                          for m in means])
        ref_gram = zg @ zg.T
        full_means, _, _ = global_reference(trainable)
    else:
        full_means, ref_gram, _ = global_reference(shared)
    ref_coef = LossBalancing(cfg, TASKS, static_weights={}, world_size=1).balancer.coefficients(
        ref_gram, torch.stack([m.detach() for m in full_means]), present=torch.ones(len(TASKS), dtype=torch.bool))
    expected = torch.autograd.grad(sum(float(c) * m for c, m in zip(ref_coef, full_means)), trainable)

    scale = ref_gram.abs().max()
    key = f"{statistics}/{gram_kind}"
    cos = lambda k: float(k[0, 1] / (k[0, 0] * k[1, 1]).sqrt())  # noqa: E731
    report[key] = {
        "gram_error": float((step.stats.gram - ref_gram).abs().max() / scale),
        "coef_error": float((step.coefficients.double() - ref_coef).abs().max()),
        "grad_error": max(float((a - e).abs().max() / e.abs().max().clamp(min=1e-300)) for a, e in zip(averaged, expected)),
        "cos_ab": cos(step.stats.gram), "cos_ab_reference": cos(ref_gram),
        "identical_on_ranks": all_equal(step.stats.gram) and all_equal(step.coefficients),
    }
    if shared is not None:
        # Sources A and B: the Gram of their parts of the update, against one process's.
        mine = source_gram(step.stats, step.coefficients, balancing.unit_tasks, balancing.unit_sources,
                           balancing.sources)
        _, _, ref_sources = global_reference(shared, step.coefficients)
        report[key]["source_gram_error"] = float((mine - ref_sources).abs().max() / ref_sources.abs().max())
        report[key]["source_cos"] = cos(mine)
        metrics = balancing.metrics(step)
        report[key]["logged_source_cos"] = metrics["balancer/source_cos/A/B"]
    if gram_kind == "sketch":
        # The CountSketch bound per entry: std <= sqrt((K_ii K_jj + K_ij^2) / k).
        diag = ref_gram.diagonal()
        std = ((diag[:, None] * diag[None, :] + ref_gram ** 2) / SKETCH_DIM).sqrt()
        report[key]["max_error_in_std"] = float(((step.stats.gram - ref_gram).abs() / std).max())
    if statistics == "fpn" and gram_kind == "exact":
        # What summing per-rank Grams (no cross-rank terms) would give.
        targets_now = targets[OWNED[rank]]
        out, batch, counts = local_output()
        z = trunk(images[OWNED[rank]])
        losses, mask = per_sample_losses(z), LABELLED[OWNED[rank]]
        sums = {t: (losses[:, i] * mask[:, i]).sum() for i, t in enumerate(TASKS)}
        local = task_gradients_wrt(shared, sums, TASKS, skip=(counts == 0).tolist())
        summed = reduce_statistics(gram_matrix(local, dtype=torch.float64), torch.zeros(3), counts, world_size=world)
        report[key]["summed_local_grams_error"] = float((summed.gram - ref_gram).abs().max() / scale)

# Both ways of exchanging the gradient blocks give this rank's share of the same Gram.
torch.manual_seed(100 + rank)
blocks = [[torch.randn(5, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)] for _ in range(3)]
shares = {e: shared_gram_partial(blocks, blocks[0], world_size=world, dtype=torch.float64, exchange=e)
          for e in ("all_to_all", "reduce_scatter")}
for share in shares.values():
    dist.all_reduce(share)
summed = [torch.cat([b.reshape(-1) for b in task]) for task in blocks]
for part in summed:
    dist.all_reduce(part)
expected_gram = torch.stack(summed) @ torch.stack(summed).T
report["exchange_errors"] = {e: float((g - expected_gram).abs().max() / expected_gram.abs().max()) for e, g in shares.items()}

# The sketch itself is one seeded linear map: the same on every rank.
sketch = CountSketch(trainable, dim=64, seed=SKETCH_SEED)
assert all_equal(sketch.bucket) and all_equal(sketch.sign.to(torch.int64))
if rank == 0:
    print("REPORT " + json.dumps(report))
dist.destroy_process_group()
