"""torchrun worker: globally normalised task losses give the big-batch gradient under DDP,
also when the step is split into micro-batches (gradient accumulation)."""
import torch
import torch.distributed as dist

from trainer.task_losses import scale_task_losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
tasks = ("a", "b")
xs = {"a": torch.randn(7), "b": torch.randn(3)}
# Per rank, two micro-batches: lists of sample indices per task (uneven; rank 1 has no "b").
owned = [
    [{"a": [0], "b": [0, 1]}, {"a": [1, 2], "b": [2]}],
    [{"a": [3, 4, 5], "b": []}, {"a": [6], "b": []}],
][rank]
local_total = torch.tensor([[len(m[t]) for t in tasks] for m in owned], dtype=torch.float32).sum(0)
global_counts = local_total.clone()
dist.all_reduce(global_counts)

w = torch.zeros(2, requires_grad=True)
for micro in owned:
    losses, counts = {}, []
    for i, t in enumerate(tasks):
        idx = micro[t]
        # absent task: an exact zero that stays in the graph, as heads do
        losses[t] = ((w[i] - xs[t][idx]) ** 2).mean() if idx else w[i] * 0.0
        counts.append(float(len(idx)))
    scaled = scale_task_losses(losses, torch.tensor(counts), global_counts, world_size=world)
    sum(scaled.values()).backward()  # grads accumulate over micro-batches
grad = w.grad.clone()
dist.all_reduce(grad)
grad /= world  # what DDP does

w_ref = torch.zeros(2, requires_grad=True)
sum(((w_ref[i] - xs[t]) ** 2).mean() for i, t in enumerate(tasks)).backward()
assert torch.allclose(grad, w_ref.grad, atol=1e-6), (grad, w_ref.grad)
assert global_counts.tolist() == [7.0, 3.0], global_counts
print(f"rank {rank} ok")
dist.destroy_process_group()
