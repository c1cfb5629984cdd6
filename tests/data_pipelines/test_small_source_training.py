"""Issue 14 item 5: a 4-image source trains on 2 ranks with the default
``data.readers_per_rank: 4`` (8 reader slots), a real launch through `polytask launch`
(torchrun, gloo): one log line says how the source is dealt out, and the audit trail shows
every image once per epoch (issue 18: each epoch goes to 4 of the 8 slots, rotating)."""
import itertools
import json
import subprocess
import sys
from collections import Counter

from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.source_reader import SourceReader
from tests.conftest import REPO
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source

WORLD, STEPS = 2, 4  # 4 steps: every reader of each rank builds one batch
IMAGES = 4


def test_a_four_image_source_trains_on_two_ranks_with_the_default_readers(tmp_path):
    defaults = DataConfig(sources=[SourceConfig(path="unused")])
    readers, batch = defaults.readers_per_rank, 2  # the demo config's batch size
    assert readers == 4 and WORLD * readers > IMAGES
    samples = [boxed_sample(f"img{i}", height=32, width=32, seed=i, category_id=1, class_id=i % 2)
               for i in range(IMAGES)]
    write_source(tmp_path / "tiny", samples, name="tiny", tasks=["classification"], classes=["a", "b"])
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", f"--nproc-per-node={WORLD}",
           f"data.sources=[{{path: {tmp_path / 'tiny'}}}]", "model.tasks=[classification]", "eval.sources=[]",
           "eval.best_metric=null", f"trainer.max_steps={STEPS}", "data.audit=true", "wandb.mode=disabled",
           "data.transforms.image_size=64", f"data.batch_size={batch}", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    lines = [line for line in proc.stderr.splitlines() if "reader slots" in line]
    assert len(lines) == 1 and "[rank 0]" in lines[0], lines
    assert ("source 'tiny' has 4 samples for 8 reader slots (world_size 2 x data.readers_per_rank 4): each epoch "
            "gives 4 of the slots a sample, the others read in the next epochs") in lines[0]

    trails = [[json.loads(line) for line in (run_dir / "audit" / f"rank_{r}.jsonl").read_text().splitlines()]
              for r in range(WORLD)]
    assert [[row["step"] for row in trail] for trail in trails] == [list(range(1, STEPS + 1))] * WORLD
    trained = [k for trail in trails for row in trail for k in row["keys"]]
    # 4 steps x 2 ranks x 2 samples = 4 epochs of 4 images: each image 4 times.
    assert Counter(trained) == Counter({f"tiny/img{i}": STEPS for i in range(IMAGES)})

    # The same keys, replayed from the epoch plan with their epochs: each epoch holds every image once.
    manifest = load_manifest(tmp_path / "tiny")
    plan = SourcePlan(name="tiny", urls=tuple(manifest.shard_urls()), shard_sizes=(IMAGES,),
                      seed=defaults.seed, block_size=defaults.shuffle_buffer, open_shards=defaults.open_shards)
    by_epoch: dict[int, Counter] = {}
    for rank, trail in enumerate(trails):
        slots = [SourceReader(plan, slot=rank * readers + l, num_slots=WORLD * readers) for l in range(readers)]
        for row in trail:
            reader = slots[(row["step"] - 1) % readers]  # reader l builds batches l, l + R, ...
            items = list(itertools.islice(reader, batch))
            assert row["keys"] == [f"tiny/{item.payload['__key__']}" for item in items], (rank, row)
            for item in items:
                by_epoch.setdefault(item.epoch, Counter())[item.payload["__key__"]] += 1
    assert sorted(by_epoch) == [0, 1, 2, 3]
    assert all(seen == Counter(f"img{i}" for i in range(IMAGES)) for seen in by_epoch.values()), by_epoch
