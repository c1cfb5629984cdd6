"""Bad samples under ``skip`` in a real 2-rank run (torchrun, gloo): the count logged in
metrics.jsonl is over both ranks, and too many bad samples of a source stop every rank
with the same error, judged over both ranks."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from tests.conftest import REPO
from tests.data_pipelines.shard_fixtures import jpeg_bytes, sample_member, write_source

NUM_SAMPLES, SIZE = 16, 32
BAD_KEYS = {f"c{i:03d}" for i in range(0, NUM_SAMPLES, 4)}  # every 4th sample: both ranks read some
SKIPPED = re.compile(r"\[rank (\d)\] WARNING data_pipelines\.streaming\.stream: source 'cls': skipped bad sample")


def _write_classes_source(root) -> None:
    samples = []
    for i in range(NUM_SAMPLES):
        key = f"c{i:03d}"
        meta = {"image": {"id": i, "file_name": f"{key}.jpg", "width": SIZE, "height": SIZE},
                "annotations": [], "class_id": i % 2}
        image = b"not a jpeg" if key in BAD_KEYS else jpeg_bytes(SIZE, SIZE, seed=i)
        samples.append(sample_member(key, image=image, meta=meta))
    write_source(root, samples, name="cls", tasks=["classification"], shard_size=4, classes=["a", "b"])


def _launch(tmp_path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, object]:
    """A 3-step 2-rank run of a tiny classification model on the bad source."""
    run_dir = tmp_path / name
    config = {
        "run": {"dir": str(run_dir)},
        "data": {"sources": [{"path": str(tmp_path / "cls")}], "batch_size": 2, "num_workers": 0,
                 "readers_per_rank": 1, "shuffle_buffer": 4, "transforms": {"image_size": SIZE}},
        "model": {"backbone": "resnet18", "tasks": ["classification"], "fpn_channels": 64},
        "trainer": {"max_steps": 3, "device": "cpu", "log_every": 1},
        "wandb": {"mode": "disabled"},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "launcher", "launch", str(tmp_path / f"{name}.yaml"), "--nproc-per-node", "2",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, run_dir


def test_bad_samples_are_counted_over_both_ranks_and_judged_over_the_source(tmp_path):
    _write_classes_source(tmp_path / "cls")
    # 4 of 16 bad is 25 %: within max_bad_fraction=0.5, so the run goes on.
    proc, run_dir = _launch(tmp_path, "within", "data.max_bad_fraction=0.5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    skipped_by_rank = [sum(1 for m in SKIPPED.finditer(out) if m.group(1) == str(r)) for r in (0, 1)]
    assert skipped_by_rank[1] > 0, out[-6000:]  # rank 1 skipped some: rank 0's count alone would miss them
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # num_workers=0: what a rank read is what it consumed by the last step, every skip logged.
    assert rows[-1]["data/cls/bad_samples"] == sum(skipped_by_rank)

    # 25 % against max_bad_fraction=0.1, judged from 4 samples read over both ranks: the
    # first log line stops both ranks, with the same numbers.
    proc, run_dir = _launch(tmp_path, "past", "data.max_bad_fraction=0.1", "data.bad_fraction_min_samples=4")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-6000:]
    errors = {m.group(1): m.group(2) for m in re.finditer(r"\[rank (\d)\] ERROR trainer\.main: (.*)", out)}
    assert set(errors) == {"0", "1"} and errors["0"] == errors["1"], out[-6000:]
    assert re.fullmatch(r"source 'cls': \d+ of \d+ samples read by all 2 rank\(s\) were bad, more than "
                        r"data\.max_bad_fraction=0\.1 \(judged against at least data\.bad_fraction_min_samples=4 "
                        r"samples; .*\)", errors["0"]), errors
