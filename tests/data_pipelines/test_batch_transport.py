import pickle

import torch
from torchvision import tv_tensors

from data_pipelines.streaming.batch_transport import pack, unpack
from data_pipelines.streaming.collate import collate
from data_pipelines.schema import TASK_TYPES, task_mask_for


def _sample(i: int, **targets) -> dict:
    image = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return {"key": f"s/{i}", "source": "s", "image": tv_tensors.Image(image),
            "task_mask": task_mask_for(["detection"] if "boxes" in targets else [], ["detection", "classification"]), **targets}


SAMPLES = [
    _sample(0, boxes=tv_tensors.BoundingBoxes(torch.rand(2, 4), format="XYXY", canvas_size=(5, 5)),
            labels=torch.tensor([1, 2]), masks=tv_tensors.Mask(torch.ones(2, 5, 5, dtype=torch.uint8))),
    _sample(1, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), **{"class_label/a": torch.tensor(3)},
            semantic=tv_tensors.Mask(torch.full((5, 5), 7))),
    _sample(2, boxes=torch.rand(1, 4), labels=torch.tensor([0]), masks=torch.zeros(1, 5, 5, dtype=torch.uint8),
            **{"class_label/a": torch.tensor(1)}, semantic=torch.zeros(5, 5, dtype=torch.int64)),
]


def test_unpack_of_pack_is_the_collated_batch_from_one_buffer():
    packed = pack(SAMPLES)
    # Everything in one tensor: one shared-memory segment per batch.
    assert [v for v in vars(packed).values() if isinstance(v, torch.Tensor)] == [packed.buffer]
    assert packed.buffer.dtype == torch.uint8  # images travel as uint8
    out, want = unpack(pickle.loads(pickle.dumps(packed))), collate(SAMPLES)
    assert out.keys == want.keys and out.sources == want.sources
    assert out.images.dtype == torch.float32 and torch.equal(out.images, want.images)
    assert torch.equal(out.task_mask, want.task_mask) and out.task_mask.dtype == torch.bool
    for got, expected in zip(out.targets, want.targets):
        assert got.keys() == expected.keys()
        for k in expected:
            assert type(got[k]) is torch.Tensor and got[k].dtype == expected[k].dtype, k
            assert torch.equal(got[k], expected[k]), k


def _sized(i: int, height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(i)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    return {"key": f"s/{i}", "source": "s", "image": tv_tensors.Image(image),
            "task_mask": task_mask_for(["detection", "instance_mask", "semantic"], TASK_TYPES),
            "boxes": tv_tensors.BoundingBoxes(torch.rand(2, 4), format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([1, 2]), "masks": tv_tensors.Mask(torch.ones(2, height, width, dtype=torch.uint8)),
            "semantic": tv_tensors.Mask(torch.randint(0, 3, (height, width), generator=g))}


def test_padded_batches_cross_processes_with_their_image_sizes():
    # Aspect-preserving resizes give each sample its own size: the worker pads them as collate does.
    samples = [_sized(0, 5, 8), _sized(1, 7, 4), _sized(2, 6, 6)]
    packed = pack(samples)
    assert [v for v in vars(packed).values() if isinstance(v, torch.Tensor)] == [packed.buffer]
    out, want = unpack(pickle.loads(pickle.dumps(packed))), collate(samples)
    assert out.image_sizes.tolist() == want.image_sizes.tolist() == [[5, 8], [7, 4], [6, 6]]
    assert out.images.shape == (3, 3, 7, 8) and torch.equal(out.images, want.images)
    for got, expected in zip(out.targets, want.targets):
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
