"""trainer.precision=bf16 means the same thing under both backends: torch autocast over
fp32 weights. The first step's losses (same weights, same batches, no update yet) are
therefore equal under DDP and DeepSpeed ZeRO-2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, demo_source_overrides
from trainer.backends.deepspeed_checkpoint import zero_model_state_dict

STEPS = 2


def _train(demo_sources, run_dir, *extra):
    overrides = [*demo_source_overrides(demo_sources), f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.precision=bf16",
                  "wandb.mode=disabled", "eval.sources=[]", "eval.best_metric=null", *extra]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node=2", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", **os.environ})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows if "step" in r}


@pytest.mark.distributed
def test_bf16_is_autocast_over_fp32_weights_under_both_backends(demo_sources, tmp_path):
    ddp = _train(demo_sources, tmp_path / "ddp", "trainer.backend=ddp")
    zero = _train(demo_sources, tmp_path / "zero2", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2")
    assert ddp[1] and ddp[1] == zero[1]  # bitwise: the same forward
    assert all(v == v for v in zero[STEPS].values())  # finite, trained on
    weights = zero_model_state_dict(tmp_path / "zero2" / "checkpoints" / f"step_{STEPS}")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}  # master weights kept fp32
