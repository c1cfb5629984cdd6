import torch

from data_pipelines.batch_transport import pack, unpack
from data_pipelines.schema import Batch, task_mask_for


def test_pack_unpack_round_trip_with_targets_some_samples_lack():
    targets = [
        {"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2]), "masks": torch.ones(2, 5, 5, dtype=torch.uint8)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "class_label": torch.tensor(3),
         "semantic": torch.full((5, 5), 7)},
        {"boxes": torch.rand(1, 4), "labels": torch.tensor([0]), "masks": torch.zeros(1, 5, 5, dtype=torch.uint8),
         "class_label": torch.tensor(1), "semantic": torch.zeros(5, 5, dtype=torch.int64)},
    ]
    batch = Batch(images=torch.rand(3, 3, 5, 5), targets=targets, task_mask=torch.stack([task_mask_for([])] * 3),
                  keys=["a/1", "b/2", "c/3"], sources=["a", "b", "c"])
    packed = pack(batch)
    assert len(packed.targets) == 5  # one tensor per target key, not per sample
    out = unpack(packed)
    assert out.keys == batch.keys and out.sources == batch.sources and torch.equal(out.images, batch.images)
    for got, want in zip(out.targets, targets):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
