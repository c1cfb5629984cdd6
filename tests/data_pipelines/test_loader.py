import itertools

import pytest
import torch
from torchvision import tv_tensors

from data_pipelines.streaming.collate import collate
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.schema import IGNORE_INDEX, TASK_TYPES, Batch, task_mask_for
from data_pipelines.streaming.config import TransformConfig
from tests.data_pipelines.shard_fixtures import KEYPOINT_SCHEMA, boxed_sample, sample_member, write_source

SIZE = 16
DET_TASKS = ["detection", "instance_mask", "keypoints"]
SEG_TASKS = ["semantic", "classification"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    # Uneven shard counts and sizes (4+2 and 2+2+1).
    det = [boxed_sample(f"d{i:03d}", height=24, width=32, seed=i, category_id=5) for i in range(6)]
    person = [{"id": 5, "name": "person"}]
    write_source(root / "det", det, name="det", tasks=DET_TASKS, categories=person, keypoints=KEYPOINT_SCHEMA)
    seg = [
        boxed_sample(f"s{i:03d}", height=20, width=20, seed=100 + i, category_id=1, class_id=i % 2) for i in range(5)
    ]
    write_source(
        root / "seg", seg, name="seg", tasks=SEG_TASKS, shard_size=2,
        semantic_classes=["bg", "thing"], classes=["even", "odd"],
    )
    return root


def config(root, **overrides) -> DataConfig:
    kwargs = dict(
        sources=[SourceConfig(path=str(root / "det")), SourceConfig(path=str(root / "seg"))],
        batch_size=3,
        num_workers=0,
        readers_per_rank=2,
        seed=11,
        shuffle_buffer=4,
        transforms=TransformConfig(image_size=SIZE),
    )
    return DataConfig(**(kwargs | overrides))


def take(cfg: DataConfig, *, rank: int, steps: int) -> list[Batch]:
    loader, _, _ = build_train_loader(cfg, rank=rank, world_size=2)
    return list(itertools.islice(loader, steps))


def check_batch(batch: Batch) -> None:
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.images.shape == (3, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.task_mask.shape == (3, len(TASK_TYPES)) and batch.task_mask.dtype == torch.bool
    for key, source, mask, target in zip(batch.keys, batch.sources, batch.task_mask, batch.targets):
        assert key.startswith(f"{source}/")
        assert all(type(t) is torch.Tensor for t in target.values())  # tv_tensors unwrapped
        if source == "det":
            assert torch.equal(mask, task_mask_for(DET_TASKS, TASK_TYPES))
            n = len(target["boxes"])
            assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
            assert target["labels"].dtype == torch.int64 and target["iscrowd"].dtype == torch.bool
            assert target["masks"].shape == (n, SIZE, SIZE) and target["masks"].dtype == torch.uint8
            assert target["keypoints"].shape == (n, 3, 2) and target["keypoint_visibility"].shape == (n, 3)
            assert "semantic" not in target
        else:
            assert source == "seg" and torch.equal(mask, task_mask_for(SEG_TASKS, TASK_TYPES))
            assert target["semantic"].shape == (SIZE, SIZE) and target["semantic"].dtype == torch.int64
            assert target["class_label/classification"].shape == () and target["class_label/classification"].dtype == torch.int64
            assert "masks" not in target


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_distinct_reproducible_batches(sources, num_workers):
    cfg = config(sources, num_workers=num_workers)
    steps = 6
    rank0, rank1 = take(cfg, rank=0, steps=steps), take(cfg, rank=1, steps=steps)
    for batch in rank0 + rank1:
        check_batch(batch)
    keys0 = [k for b in rank0 for k in b.keys]
    keys1 = [k for b in rank1 for k in b.keys]
    assert keys0 != keys1
    # With workers, batches alternate between them; their streams must differ too.
    assert [b.keys for b in rank0[0::2]] != [b.keys for b in rank0[1::2]]
    assert {s for b in rank0 for s in b.sources} == {"det", "seg"}
    assert [k for b in take(cfg, rank=0, steps=steps) for k in b.keys] == keys0


def test_the_sequence_does_not_depend_on_the_number_of_workers(sources):
    runs = [take(config(sources, num_workers=w), rank=1, steps=6) for w in (0, 1, 2)]
    for other in runs[1:]:
        assert [b.keys for b in other] == [b.keys for b in runs[0]]
        assert all(torch.equal(a.images, b.images) for a, b in zip(runs[0], other))


def test_shards_override_reads_brace_patterns_and_pipe_urls(sources):
    # The same shards, named by a pipe: command over a brace pattern instead of the manifest.
    pattern = f"pipe:cat {sources}/seg/seg-{{000000..000002}}.tar"
    seg = SourceConfig(path=str(sources / "seg"), shards=pattern)
    cfg = config(sources, sources=[SourceConfig(path=str(sources / "det")), seg])
    assert [b.keys for b in take(cfg, rank=0, steps=4)] == [b.keys for b in take(config(sources), rank=0, steps=4)]

    short = SourceConfig(path=str(sources / "seg"), shards=f"{sources}/seg/seg-{{000000..000001}}.tar")
    with pytest.raises(ValueError, match=r"sources\[0\]\.shards.*expands to 2 URLs.*lists 3 shards"):
        build_train_loader(config(sources, sources=[short]), rank=0, world_size=1)


def test_sources_can_have_their_own_transforms(sources):
    flip_det = SourceConfig(path=str(sources / "det"), transforms=TransformConfig(image_size=SIZE, hflip_prob=1.0))
    cfg = config(sources, sources=[flip_det, SourceConfig(path=str(sources / "seg"))],
                 transforms=TransformConfig(image_size=SIZE, hflip_prob=0.0))
    plain = config(sources, transforms=TransformConfig(image_size=SIZE, hflip_prob=0.0))
    for flipped, ref in zip(take(cfg, rank=0, steps=3), take(plain, rank=0, steps=3)):
        assert flipped.keys == ref.keys
        for i, source in enumerate(ref.sources):
            expect = ref.images[i].flip(-1) if source == "det" else ref.images[i]
            assert torch.equal(flipped.images[i], expect)


def test_a_source_smaller_than_the_reader_slots_is_read_by_all_of_them_with_one_line(sources, caplog):
    """Issue 14 item 5: 6 and 5 samples for 8 reader slots train instead of failing; rank 0
    logs one line per such source saying how its epochs are dealt out."""
    import logging

    caplog.set_level(logging.INFO, logger="data_pipelines.streaming.loader")
    cfg = config(sources, readers_per_rank=4)
    for rank in range(2):
        for batch in take(cfg, rank=rank, steps=8):  # every reader builds two batches
            check_batch(batch)
    lines = [r.getMessage() for r in caplog.records if "reader slots" in r.getMessage()]
    assert lines == [
        # Issue 18: each epoch goes to as many slots as it has samples, rotating.
        "source 'det' has 6 samples for 8 reader slots (world_size 2 x data.readers_per_rank 4): each epoch gives "
        "6 of the slots a sample, the others read in the next epochs; each sample still once per epoch",
        "source 'seg' has 5 samples for 8 reader slots (world_size 2 x data.readers_per_rank 4): each epoch gives "
        "5 of the slots a sample, the others read in the next epochs; each sample still once per epoch",
    ], lines


def test_a_source_smaller_than_the_world_blocks_no_rank(tmp_path):
    """3 samples, 4 ranks: every rank still gets batches of the source, in a reproducible order."""
    samples = [boxed_sample(f"t{i}", height=12, width=12, seed=i, category_id=1, class_id=0) for i in range(3)]
    write_source(tmp_path / "tiny", samples, name="tiny", tasks=["classification"], classes=["a"])
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "tiny"))], batch_size=2, num_workers=0,
                     readers_per_rank=2, transforms=TransformConfig(image_size=SIZE))
    for rank in range(4):
        keys = [b.keys for b in itertools.islice(build_train_loader(cfg, rank=rank, world_size=4)[0], 4)]
        assert len(keys) == 4 and {k for ks in keys for k in ks} <= {"tiny/t0", "tiny/t1", "tiny/t2"}
        assert keys == [b.keys for b in itertools.islice(build_train_loader(cfg, rank=rank, world_size=4)[0], 4)]


def test_a_source_without_samples_is_named(tmp_path):
    write_source(tmp_path / "empty", [], name="empty", tasks=["classification"], shard_sizes=[0], classes=["a"])
    with pytest.raises(ValueError, match=r"DataConfig.sources\[0\].path: source 'empty' .* has no samples"):
        build_train_loader(DataConfig(sources=[SourceConfig(path=str(tmp_path / "empty"))]), rank=0, world_size=1)


def test_labels_use_the_merged_label_space(sources):
    loader, space, manifests = build_train_loader(config(sources), rank=0, world_size=2)
    assert [m.name for m in manifests] == ["det", "seg"]
    assert space.classes["detection"] == ["person"] and space.classes["classification"] == ["even", "odd"]
    for batch in itertools.islice(loader, 4):
        for key, source, target in zip(batch.keys, batch.sources, batch.targets):
            if source == "det":
                assert set(target["labels"].tolist()) <= {0}
            else:
                assert target["class_label/classification"].item() == int(key[-3:]) % 2


def test_decode_error_surfaces_with_shard_and_key(tmp_path):
    broken = sample_member("broken", image=b"not a jpeg", meta={"image": {"width": 4, "height": 4}, "annotations": []})
    write_source(tmp_path / "bad", [broken], name="bad", tasks=["detection"], categories=[{"id": 1, "name": "x"}])
    cfg = config(tmp_path, sources=[SourceConfig(path=str(tmp_path / "bad"))], readers_per_rank=1,
                 bad_sample_policy="raise")
    loader, _, _ = build_train_loader(cfg, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"bad-000000\.tar.*'broken'.*cannot decode"):
        next(iter(loader))


def test_missing_manifest_names_the_path(tmp_path):
    cfg = config(tmp_path, sources=[SourceConfig(path=str(tmp_path / "nowhere"))])
    with pytest.raises(FileNotFoundError, match=r"sources\[0\]\.path.*nowhere/manifest\.json"):
        build_train_loader(cfg, rank=0, world_size=1)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sources": []}, "sources"),
        ({"sampling": "greedy"}, "sampling"),
        ({"sampling": "fixed"}, r"sources\[0\]\.weight"),
        ({"sources": [SourceConfig(path="x", weight=2.0)]}, r"sources\[0\]\.weight"),
        ({"temperature": 0.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"composition": "per_task"}, "composition"),
        ({"readers_per_rank": 0}, "readers_per_rank"),
        ({"num_workers": 3, "readers_per_rank": 4}, "num_workers"),
        ({"bad_sample_policy": "ignore"}, "bad_sample_policy"),
        ({"max_bad_fraction": 1.0}, "max_bad_fraction"),
        ({"sources": [SourceConfig(path="x", transforms=TransformConfig(image_size=8))]},
         r"sources\[0\]\.transforms\.image_size"),
    ],
)
def test_config_validation_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"DataConfig\\.{field}"):
        config(tmp_path, **overrides)


def _sized_sample(i: int, height: int, width: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "key": f"s/{i}", "source": "s", "task_mask": task_mask_for(["detection", "instance_mask", "semantic"], TASK_TYPES),
        "image": tv_tensors.Image(torch.randint(1, 256, (3, height, width), dtype=torch.uint8, generator=g)),
        "boxes": tv_tensors.BoundingBoxes([[1.0, 1.0, 4.0, 5.0]], format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([0]),
        "masks": tv_tensors.Mask(torch.ones(1, height, width, dtype=torch.uint8)),
        "semantic": tv_tensors.Mask(torch.randint(0, 3, (height, width), generator=g)),
    }


def test_collate_pads_images_of_different_sizes_and_records_them():
    samples = [_sized_sample(0, 6, 10), _sized_sample(1, 9, 7)]
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 9, 10)
    assert batch.image_sizes.tolist() == [[6, 10], [9, 7]] and batch.image_sizes.dtype == torch.int64
    for i, (h, w) in enumerate([(6, 10), (9, 7)]):
        sample, target = samples[i], batch.targets[i]
        assert torch.equal(batch.images[i, :, :h, :w], collate([sample]).images[0])
        assert (batch.images[i, :, h:] == 0).all() and (batch.images[i, :, :, w:] == 0).all()
        assert torch.equal(target["semantic"][:h, :w], sample["semantic"])
        assert (target["semantic"][h:] == IGNORE_INDEX).all() and (target["semantic"][:, w:] == IGNORE_INDEX).all()
        assert target["masks"].shape == (1, 9, 10) and int(target["masks"].sum()) == h * w
        assert torch.equal(target["boxes"], sample["boxes"].as_subclass(torch.Tensor))  # the origin stays


def test_collate_of_one_size_is_unpadded():
    samples = [_sized_sample(0, 6, 10), _sized_sample(1, 6, 10)]
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 6, 10) and batch.image_sizes.tolist() == [[6, 10], [6, 10]]
    assert torch.equal(batch.targets[1]["semantic"], samples[1]["semantic"].as_subclass(torch.Tensor))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_short_side_batches_are_padded_to_their_largest_image(sources, num_workers):
    # det images are 24x32, seg images 20x20: at image_size 16 they become 16x21 and 16x16.
    cfg = config(sources, num_workers=num_workers,
                 transforms=TransformConfig(resize="short_side", image_size=SIZE, hflip_prob=0.0))
    mixed = 0
    for batch in take(cfg, rank=0, steps=6):
        want = [[16, 21] if source == "det" else [16, 16] for source in batch.sources]
        assert batch.image_sizes.tolist() == want
        assert batch.images.shape[-2:] == (16, max(w for _, w in want))
        for target, (h, w) in zip(batch.targets, want):
            if "semantic" in target:
                assert target["semantic"].shape == batch.images.shape[-2:]
                assert (target["semantic"][:, w:] == IGNORE_INDEX).all()
            if "masks" in target:
                assert target["masks"].shape[-2:] == batch.images.shape[-2:]
        mixed += len(set(batch.sources)) > 1
    assert mixed


def test_sources_must_share_the_resize_mode(tmp_path):
    other = SourceConfig(path="x", transforms=TransformConfig(resize="short_side", image_size=SIZE))
    with pytest.raises(ValueError, match=r"DataConfig\.sources\[1\]\.transforms\.resize"):
        config(tmp_path, sources=[SourceConfig(path="y"), other])
