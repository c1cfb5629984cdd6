"""Exactly-once split of validation samples over ranks and data-loader workers, and the
eval config's validation."""
import pytest

from data_pipelines.streaming.config import SourceConfig
from tests.trainer.evaluation.tiny_sources import NUM_IMAGES, SOURCES
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.eval_sources import map_eval_sources
from data_pipelines.streaming.eval_loader import build_eval_loader


def _shares(tiny, *, world_size, num_workers, max_images=None):
    space, manifests = map_eval_sources(tiny.label_space, tiny.manifests, [SourceConfig(path=m.root) for m in tiny.manifests])
    shares = []
    for rank in range(world_size):
        loader = build_eval_loader(
            manifests, label_space=space, transforms=tiny.transforms, rank=rank, world_size=world_size,
            batch_size=2, num_workers=num_workers, max_images=max_images,
        )
        shares.append([(r.source, r.image_id) for _, records in loader for r in records])
    return shares


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_every_sample_read_by_exactly_one_rank_and_worker(tiny, world_size, num_workers):
    shares = _shares(tiny, world_size=world_size, num_workers=num_workers)
    everything = [x for share in shares for x in share]
    assert len(everything) == len(set(everything)) == NUM_IMAGES * len(SOURCES)
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 + num_workers  # every rank gets a fair share


@pytest.mark.parametrize("max_images, picked", [(2, [0, 2]), (3, [0, 1, 3]), (5, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4])])
def test_max_images_spreads_over_each_source(tiny, max_images, picked):
    (everything,) = _shares(tiny, world_size=1, num_workers=0)
    (share,) = _shares(tiny, world_size=1, num_workers=0, max_images=max_images)
    by_source = {s: [x for x in everything if x[0] == s] for s in SOURCES}
    assert share == [by_source[s][i] for s in SOURCES for i in picked]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"every": -1}, "eval.every"),
        ({"every": 5}, "eval.sources"),
        ({"batch_size": 0}, "eval.batch_size"),
        ({"best_metric": "bbox/AP"}, "eval.best_metric"),
        ({"max_images": 0}, "eval.max_images"),
        ({"sources": [SourceConfig(path="x", weight=1.0)]}, "eval.sources[0].weight"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        EvalConfig(**kwargs)
