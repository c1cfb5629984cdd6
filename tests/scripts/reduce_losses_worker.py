"""torchrun worker: globally normalised task losses give the big-batch gradient under DDP."""
import torch
import torch.distributed as dist

from trainer.task_losses import reduce_task_losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
# Per-sample targets for two tasks; rank r owns an uneven share, and rank 1 has no "b" sample.
xs = {"a": torch.randn(5), "b": torch.randn(3)}
owned = {"a": [[0], [1, 2, 3, 4]][rank], "b": [[0, 1, 2], []][rank]}
w = torch.zeros(2, requires_grad=True)
losses, counts = {}, {}
for i, t in enumerate(("a", "b")):
    idx = owned[t]
    if idx:
        losses[t] = ((w[i] - xs[t][idx]) ** 2).mean()
    else:  # absent task: exact zero that stays in the graph, as heads do
        losses[t] = w[i] * 0.0
    counts[t] = len(idx)
reduced = reduce_task_losses(losses, counts, world_size=world)
sum(reduced.scaled.values()).backward()
grad = w.grad.clone()
dist.all_reduce(grad)
grad /= world  # what DDP does

w_ref = torch.zeros(2, requires_grad=True)
ref = sum(((w_ref[i] - xs[t]) ** 2).mean() for i, t in enumerate(("a", "b")))
ref.backward()
assert torch.allclose(grad, w_ref.grad, atol=1e-6), (grad, w_ref.grad)
assert reduced.global_count.tolist() == [5.0, 3.0], reduced.global_count
expected_mean = torch.stack([((0 - xs[t]) ** 2).mean() for t in ("a", "b")])
assert torch.allclose(reduced.global_mean, expected_mean, atol=1e-6)
print(f"rank {rank} ok")
dist.destroy_process_group()
