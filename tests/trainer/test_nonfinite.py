"""Non-finite losses or gradients: steps are skipped, the run stops naming the tasks, and
checkpoints/latest never points at non-finite weights; non-finite settings are refused."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, demo_source_overrides
from trainer.config_loading import ConfigError


def _checkpoint_floats(step_dir) -> list[np.ndarray]:
    """Every floating tensor of one of our DCP checkpoints, read from its raw bytes."""
    from trainer.checkpoint.raw_storage import RawItem, RawTensorReader

    metadata = RawTensorReader(str(step_dir)).read_metadata()
    files: dict[str, bytes] = {}
    arrays = []
    for info in metadata.storage_data.values():
        if isinstance(info, RawItem) and info.dtype in ("float32", "float64"):
            if info.relative_path not in files:
                files[info.relative_path] = (step_dir / info.relative_path).read_bytes()
            raw = files[info.relative_path][info.offset: info.offset + info.length]
            arrays.append(np.frombuffer(raw, dtype=np.dtype(info.dtype)))
    return arrays


def test_a_diverging_run_skips_bad_steps_then_stops_naming_the_tasks(demo_sources, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*demo_source_overrides(demo_sources), f"run.dir={run_dir}", "trainer.max_steps=12",
                 "trainer.log_every=1", "trainer.max_bad_steps=2", "optim.lr=1.0e+30", "optim.warmup_steps=0",
                 "optim.grad_clip=0", "checkpoint.every=1", "checkpoint.keep_last=20", "eval.sources=[]",
                 "eval.best_metric=null", "wandb.mode=disabled", "data.num_workers=0"]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    for rank in (0, 1):
        assert f"[rank {rank}]" in out
    # Two skipped steps are warned about, the third in a row stops the run, naming tasks.
    assert out.count("step skipped, no update") >= 2 * 2, out[-6000:]  # both ranks warn
    assert "more than trainer.max_bad_steps=2" in out and "non-finite loss in task(s) " in out, out[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))
    # Skipped steps leave the weights alone, so every checkpoint, latest included, is finite.
    latest = (run_dir / "checkpoints" / "latest").resolve()
    steps = sorted(run_dir.glob("checkpoints/step_*"))
    assert steps and latest in steps
    for step in steps:
        assert all(np.isfinite(a).all() for a in _checkpoint_floats(step)), step


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.grad_clip=inf", "trainer.loss_weights.detection=nan",
                                      "trainer.max_bad_steps=-1"])
def test_non_finite_settings_are_refused(override):
    from trainer.config import load_config

    with pytest.raises(ConfigError, match=override.split("=")[0].rsplit(".", 1)[0]):
        load_config(REPO / "configs" / "demo_cpu.yaml", [override])
