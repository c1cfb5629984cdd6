"""`checkpoint.format: dcp`: DDP checkpoints in DCP's stock storage, which stock PyTorch
tools read (`format_utils.dcp_to_torch_save`), and from which a run resumes exactly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, demo_source_overrides
from tests.trainer.test_checkpoint import _one_rank_group, _varied_state

STEPS = 4


def test_dcp_format_is_read_by_dcp_to_torch_save_and_by_polytask(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from trainer.checkpoint import read_dcp, write_dcp

    varied = _varied_state()  # every dtype, empty, scalar, non-contiguous
    state = {"tensors": {k: v for k, v in varied.items() if isinstance(v, torch.Tensor)},
             "train": {"step": 7, "note": "x"}}
    with _one_rank_group():
        write_dcp(state, tmp_path / "ck", storage_format="dcp")
        loaded = {"tensors": {n: torch.zeros_like(t) for n, t in state["tensors"].items()},
                  "train": {"step": 0, "note": ""}}
        read_dcp(loaded, tmp_path / "ck")
    dcp_to_torch_save(tmp_path / "ck", tmp_path / "plain.pt")
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    for what in (plain, loaded):
        assert sorted(what["tensors"]) == sorted(state["tensors"])
        for name, tensor in state["tensors"].items():
            assert what["tensors"][name].dtype == tensor.dtype and torch.equal(what["tensors"][name], tensor), name
        assert what["train"] == {"step": 7, "note": "x"}


def test_format_is_checked_and_ddp_only(tmp_path):
    from trainer.config import load_config
    from trainer.config_loading import ConfigError

    config = tmp_path / "job.yaml"
    config.write_text("data:\n  sources:\n    - path: a\n")
    assert load_config(config).checkpoint.format == "raw"
    assert load_config(config, ["checkpoint.format=dcp"]).checkpoint.format == "dcp"
    with pytest.raises(ConfigError, match=r"checkpoint.format must be one of \['raw', 'dcp'\], got 'zip'"):
        load_config(config, ["checkpoint.format=zip"])
    with pytest.raises(ConfigError, match="checkpoint.format=dcp is implemented for trainer.backend=ddp only"):
        load_config(config, ["checkpoint.format=dcp", "trainer.backend=deepspeed"])


def _run(demo_sources, run_dir):
    overrides = [*demo_source_overrides(demo_sources), f"run.dir={run_dir}", f"trainer.max_steps={STEPS}",
                 "trainer.log_every=1", "checkpoint.every=2", "checkpoint.keep_last=5", "checkpoint.format=dcp",
                 "wandb.mode=disabled", "eval.sources=[]", "eval.best_metric=null"]
    cmd = [sys.executable, "-m", "launcher", "launch", "configs/demo_cpu.yaml", "--nproc-per-node=2", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def _losses(run_dir):
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if k.startswith("loss/")}  # last one wins
    return rows


def _plain(checkpoint, out):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)  # our parts' non-tensor state (RNG, positions) too


def test_two_rank_run_in_dcp_format_converts_with_stock_tools_and_resumes_exactly(demo_sources, tmp_path):
    from trainer.weights_digest import weights_digest

    run_dir = tmp_path / "run"
    _run(demo_sources, run_dir)
    checkpoints = run_dir / "checkpoints"
    first = _plain(checkpoints / f"step_{STEPS}", tmp_path / "first.pt")
    # The weights dcp_to_torch_save gives are the ones the ranks ended training with.
    trained = json.loads((run_dir / "summary.json").read_text())["replica_digests"]
    assert weights_digest(first["model"]) == trained[0] == trained[1]
    losses = _losses(run_dir)

    # Resume from the dcp-format step_2 (latest's step_4 is gone) to the end: the same run.
    shutil.rmtree(checkpoints / f"step_{STEPS}")
    out = _run(demo_sources, run_dir)
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in out, out[-6000:]
    assert json.loads((run_dir / "summary.json").read_text())["replica_digests"] == trained
    again = _losses(run_dir)
    for step in range(3, STEPS + 1):
        assert again[step] == losses[step], f"step {step}: {again[step]} != {losses[step]}"  # bitwise
    resumed = _plain(checkpoints / f"step_{STEPS}", tmp_path / "resumed.pt")
    for part in ("model", "optimizer"):
        flat_a, flat_b = _tensors(first[part]), _tensors(resumed[part])
        assert sorted(flat_a) == sorted(flat_b) and flat_a
        for key, tensor in flat_a.items():
            assert torch.equal(flat_b[key], tensor), f"{part}.{key}"


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict/list, by its path."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        else:
            out.update(_tensors(value, f"{prefix}{key}."))
    return out
