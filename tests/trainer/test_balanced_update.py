"""The balanced step's update, on the real multi-task model: whatever the statistics, one
backward of ``LossBalancing``'s loss gives EVERY parameter (heads and trunk) the gradient of
Σ c_i L_i with the balancer's coefficients c — the heads from their statistics passes
(they are not run backward again), the trunk through z."""
import pytest
import torch

from data_pipelines.schema import TASK_TYPES
from models import ModelConfig, build_model
from tests.models.synthetic import NUM_CLASSES, make_batch, make_target
from trainer.balancing import LossBalancing
from trainer.config import BalancerConfig
from trainer.task_losses import local_task_counts

SMALL = dict(fpn_channels=64, semantic_channels=64, fcos_num_convs=1, mask_head_convs=1, keypoint_head_convs=1,
             classification_head_convs=1)


@pytest.mark.parametrize("statistics", ["features", "fpn"])
def test_one_backward_gives_every_parameter_the_weighted_task_gradients(statistics: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL), num_classes=NUM_CLASSES)
    tasks = list(model.heads)
    task_mask = torch.ones(3, len(TASK_TYPES), dtype=torch.bool)
    task_mask[0, TASK_TYPES.index("semantic")] = False  # partial labels: each task on its own rows
    task_mask[1, TASK_TYPES.index("keypoints")] = False
    task_mask[2, TASK_TYPES.index("classification")] = False
    batch = make_batch([make_target(s) for s in range(3)], task_mask=task_mask, seed=4)
    batch.sources = ["a", "a", "b"]
    counts = local_task_counts(batch, tasks)
    balancing = LossBalancing(BalancerConfig(name="pcgrad", statistics=statistics), tasks, static_weights={},
                              world_size=1, source_tasks={"a": tasks, "b": tasks})
    step = balancing.balanced_loss(model(batch, detach_features=True), batch, counts, trunk=model.backbone,
                                   heads=model.heads)
    step.total.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    c = step.coefficients.float()
    assert not torch.allclose(c, c[0].expand_as(c))  # the test means something only if the tasks are weighted

    model.zero_grad(set_to_none=True)
    losses = model(batch).losses  # the plain model: heads on z attached, one global batch = this one
    sum(c[i] * losses[t] for i, t in enumerate(tasks)).backward()
    # Round-off scale: some gradients are themselves round-off (~1e-8), so not per parameter.
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:  # a parameter no loss uses: the balanced step gives it zero
            assert torch.count_nonzero(got[name]) == 0, name
            continue
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6 * scale), name
        checked += 1
    head_names = [n for n, _ in model.named_parameters() if n.startswith("heads.")]
    assert checked > len(head_names)  # heads and trunk both checked
