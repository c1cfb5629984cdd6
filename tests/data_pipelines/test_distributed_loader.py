"""Real multi-process loading: 2 ranks (torchrun) x 2 data-loader workers over a source
whose shard count and sizes do not divide evenly; resume in another process."""
import itertools
import json
from collections import Counter

import pytest
import torch

from data_pipelines.streaming.epoch_plan import samples_through
from data_pipelines.streaming.loader import build_train_loader
from tests.conftest import SCRIPTS, run_torchrun
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source
from tests.scripts.loader_worker import config, record

SIZES = [5, 5, 5, 5, 5, 5, 3]  # 7 shards, 33 samples: 4 reader slots get 8, 8, 8 and 9
N = sum(SIZES)
WORLD, READERS, BATCH = 2, 2, 3
STEPS, STOP = 14, 5  # 7 batches = 21 samples per reader: two whole epochs and a bit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    samples = [boxed_sample(f"u{i:03d}", height=12, width=12, seed=i, category_id=1, class_id=i % 3) for i in range(N)]
    write_source(root / "src", samples, name="src", tasks=["classification"], shard_sizes=SIZES, classes=["a", "b", "c"])
    out = root / "out"
    out.mkdir()
    proc = run_torchrun([str(SCRIPTS / "loader_worker.py"), "--source", str(root / "src"), "--out", str(out),
                         "--steps", str(STEPS), "--stop", str(STOP)], nproc=WORLD, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    return root / "src", out


def load(out, name):
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(WORLD)]


def test_every_sample_once_per_epoch_and_no_rank_stops_early(run):
    source, out = run
    full = load(out, "full")
    assert [len(f) for f in full] == [STEPS] * WORLD
    assert all(len(b["keys"]) == BATCH for f in full for b in f)
    epochs = {0: [], 1: [], 2: []}
    for rank, batches in enumerate(full):
        for reader in range(READERS):
            # A reader's keys in order; its epoch shares follow each other.
            keys = [k for b in batches[reader::READERS] for k in b["keys"]]
            ends = [samples_through(N, epoch=e, slot=rank * READERS + reader, num_slots=WORLD * READERS)
                    for e in (-1, *epochs)]
            for epoch in epochs:
                epochs[epoch] += keys[ends[epoch] : ends[epoch + 1]]
    everything = Counter(f"src/u{i:03d}" for i in range(N))
    assert Counter(epochs[0]) == everything and Counter(epochs[1]) == everything
    assert max(Counter(epochs[2]).values()) == 1  # the epoch under way: nothing twice
    assert epochs[0] != epochs[1]  # reshuffled


def test_sequence_is_reproducible_and_independent_of_workers(run):
    source, out = run
    for rank, batches in enumerate(load(out, "full")):
        loader, _, _ = build_train_loader(config(str(source), num_workers=0), rank=rank, world_size=WORLD)
        again = record(itertools.islice(loader, STEPS))
        assert [b["keys"] for b in again] == [b["keys"] for b in batches]
        assert [b["checksum"] for b in again] == pytest.approx([b["checksum"] for b in batches], rel=1e-6)


def test_resume_in_a_new_process_continues_the_sequence(run):
    source, out = run
    for rank, (full, head) in enumerate(zip(load(out, "full"), load(out, "head"))):
        state = torch.load(out / f"state_rank{rank}.pt", weights_only=True)
        loader, _, _ = build_train_loader(config(str(source), num_workers=1), rank=rank, world_size=WORLD)
        loader.load_state_dict(state)
        tail = record(itertools.islice(loader, STEPS - STOP))
        assert [b["keys"] for b in head + tail] == [b["keys"] for b in full]
        assert [b["checksum"] for b in head + tail] == pytest.approx([b["checksum"] for b in full], rel=1e-6)
