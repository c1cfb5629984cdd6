"""Batches reach the trainer's device in one host-to-device copy of the packed buffer.

The "meta" device stands in for a GPU on CPU-only machines: a copy to it is a real
cross-device copy that a dispatch mode can count; CUDA pinning itself needs a GPU
(bench/gpu_check.sh)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipelines.streaming.batch_transport import pack, unpack
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from tests.data_pipelines.test_batch_transport import SAMPLES


class CrossDeviceCopies(TorchDispatchMode):
    """Counts ops that take a tensor on one device and return one on another."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.device for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        outputs = {o.device for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)}
        if inputs and outputs and inputs != outputs:
            self.count += 1
        return out


def _tensors(batch) -> list[torch.Tensor]:
    return [batch.images, batch.task_mask, *(v for t in batch.targets for v in t.values())]


def test_unpack_to_a_device_is_one_copy_of_the_buffer_and_batch_to_adds_none():
    packed = pack(SAMPLES)
    with CrossDeviceCopies() as copies:
        batch = unpack(packed, device="meta")
    assert copies.count == 1
    assert all(t.device.type == "meta" for t in _tensors(batch))
    assert batch.images.dtype == torch.float32 and batch.images.shape == (3, 3, 5, 5)
    with CrossDeviceCopies() as copies:
        moved = batch.to("meta")  # what train_step does: nothing left to move
    assert copies.count == 0 and moved.images is batch.images


def test_unpack_on_the_host_device_is_the_plain_unpack():
    packed = pack(SAMPLES)
    plain, on_cpu = unpack(packed), unpack(packed, device=torch.device("cpu"))
    assert torch.equal(plain.images, on_cpu.images) and torch.equal(plain.task_mask, on_cpu.task_mask)
    for a, b in zip(plain.targets, on_cpu.targets):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_pins_memory_only_for_cuda(demo_sources):
    from data_pipelines.demo.shards import demo_source_paths

    cfg = DataConfig(sources=[SourceConfig(path=p) for p in demo_source_paths(demo_sources)], num_workers=0)
    loader, _, _ = build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    assert loader.pin_memory is False  # pinning needs CUDA; on CPU it would only cost a copy
    batch = next(iter(loader))
    assert batch.images.device.type == "cpu" and batch.images.dtype == torch.float32
