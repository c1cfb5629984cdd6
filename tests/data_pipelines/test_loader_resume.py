"""Loader state: stop mid-epoch, save, rebuild from the state (any worker count): the
concatenated batches equal the uninterrupted run's, images included."""
import itertools
import json

import pytest
import torch

from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.config import TransformConfig
from tests.data_pipelines.shard_fixtures import KEYPOINT_SCHEMA, boxed_sample, write_source

STEPS = 12


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    det = [boxed_sample(f"d{i:03d}", height=24, width=32, seed=i, category_id=5) for i in range(11)]
    write_source(root / "det", det, name="det", tasks=["detection", "instance_mask", "keypoints"], shard_sizes=[4, 4, 3],
                 categories=[{"id": 5, "name": "person"}], keypoints=KEYPOINT_SCHEMA)
    cls = [boxed_sample(f"c{i:03d}", height=20, width=20, seed=50 + i, category_id=1, class_id=i % 2) for i in range(9)]
    write_source(root / "cls", cls, name="cls", tasks=["classification"], shard_sizes=[2, 5, 2], classes=["a", "b"])
    return root


def config(root, **overrides) -> DataConfig:
    kwargs = dict(
        sources=[SourceConfig(path=str(root / "det")), SourceConfig(path=str(root / "cls"))],
        batch_size=3, num_workers=0, readers_per_rank=2, seed=3, shuffle_buffer=3,
        transforms=TransformConfig(image_size=16, scale_range=(0.6, 1.4), brightness=0.3),
    )
    return DataConfig(**(kwargs | overrides))


def batches(loader, n):
    return [(b.keys, b.images) for b in itertools.islice(loader, n)]


def same(a, b) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


@pytest.mark.parametrize("workers_before, workers_after, stop", [(0, 0, 5), (2, 0, 7), (0, 2, 4), (2, 1, 6)])
def test_resume_mid_epoch_continues_the_exact_sequence(sources, workers_before, workers_after, stop):
    full, _, _ = build_train_loader(config(sources, num_workers=2), rank=1, world_size=2)
    expected = batches(full, STEPS)

    loader, _, _ = build_train_loader(config(sources, num_workers=workers_before), rank=1, world_size=2)
    head = batches(loader, stop)
    # What a checkpoint stores and torch.load(weights_only=True) gives back: plain data only.
    state = json.loads(json.dumps(loader.state_dict()))

    resumed, _, _ = build_train_loader(config(sources, num_workers=workers_after), rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert same(head + batches(resumed, STEPS - stop), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_before_iterating_is_the_start_and_loading_restarts_a_running_loader(sources, workers):
    loader, _, _ = build_train_loader(config(sources, num_workers=workers), rank=0, world_size=2)
    start = loader.state_dict()
    first = batches(loader, 6)
    loader.load_state_dict(start)
    assert same(batches(loader, 3), first[:3])
    # Iterating again continues after the last batch handed out (prefetched ones are not lost).
    assert same(batches(loader, 3), first[3:])


def test_state_of_another_layout_is_refused_naming_the_difference(sources):
    loader, _, _ = build_train_loader(config(sources), rank=0, world_size=2)
    state = loader.state_dict()
    other, _, _ = build_train_loader(config(sources, seed=4), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"another data layout: seed 3 -> 4"):
        other.load_state_dict(state)
    wider, _, _ = build_train_loader(config(sources, readers_per_rank=1), rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"world_size 2 -> 4; readers_per_rank 2 -> 1"):
        wider.load_state_dict(state)


def test_homogeneous_batches_agree_across_ranks(sources):
    cfg = config(sources, composition="homogeneous")
    ranks = [build_train_loader(cfg, rank=r, world_size=2)[0] for r in range(2)]
    for b0, b1 in itertools.islice(zip(*ranks), 8):
        # (Keys may repeat across ranks here: each slot's share of an epoch of these tiny
        # sources, 2-3 samples, is smaller than a batch, so a step can cross an epoch.)
        assert len(set(b0.sources)) == 1 and b0.sources == b1.sources


def test_data_metrics_count_samples_and_epochs_per_source(sources):
    loader, _, _ = build_train_loader(config(sources, num_workers=2), rank=0, world_size=2)
    seen = [s for b in itertools.islice(loader, 10) for s in b.sources]
    row = loader.data_metrics()
    for name, size in (("det", 11), ("cls", 9)):
        assert row[f"data/{name}/samples"] == seen.count(name)
        assert row[f"data/{name}/bad_samples"] == 0
        assert row[f"data/{name}/epoch"] == pytest.approx(seen.count(name) / (size / 2))
        assert row[f"data/{name}/realised"] == pytest.approx(seen.count(name) / len(seen))
    assert row["data/det/target"] == pytest.approx(11 / 20)
    assert row["data/task/classification/target"] == pytest.approx(9 / 20)
    assert row["data/task/keypoints/realised"] == pytest.approx(seen.count("det") / len(seen))
    assert "data/task/semantic/target" not in row  # no source labels it
