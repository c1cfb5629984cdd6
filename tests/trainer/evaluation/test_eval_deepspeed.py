"""`polytask eval` on DeepSpeed ZeRO checkpoints: real 2-rank ZeRO-2 and ZeRO-3 trainings on
the tiny sources, evaluated on 1 and 2 ranks; the weights evaluated are the weights trained."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from tests.trainer.evaluation.tiny_sources import SOURCES
from trainer.backends.deepspeed_checkpoint import load_file, state_dir, zero_model_state_dict
from trainer.checkpoint import CheckpointLoadError
from trainer.weights_digest import weights_digest

STEPS = 2
_LOADED = re.compile(r"\[rank (\d+)\] INFO trainer\.backends: loaded model weights from .* sha256 ([0-9a-f]{64})")


def _overrides(tiny, run_dir, *extra):
    sources = "[" + ", ".join(f"{{path: {tiny.paths[name]}}}" for name in SOURCES) + "]"
    return [
        f"run.dir={run_dir}", f"data.sources={sources}", f"eval.sources={sources}", "eval.num_workers=0",
        "data.num_workers=0", "data.readers_per_rank=2", "data.transforms.image_size=64", f"trainer.max_steps={STEPS}",
        "trainer.log_every=1", "wandb.mode=disabled", "checkpoint.resume=never", "eval.best_metric=null",
        # Every candidate box is kept: the results files then hold scores and boxes that change
        # with any weight (at the default threshold a 2-step model predicts nothing).
        "model.detection_score_thresh=0.0", *extra,
    ]


def _polytask(args, *, nproc):
    """`polytask ARGS` in one process (nproc 1) or under torchrun."""
    if nproc > 1:
        return run_torchrun(["-m", "launcher", *args], nproc=nproc, timeout=300)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _train(tiny, run_dir, stage, *extra):
    args = ["launch", "configs/demo_cpu.yaml", "--nproc-per-node=2",
            *_overrides(tiny, run_dir, "trainer.backend=deepspeed", f"trainer.deepspeed.zero_stage={stage}", *extra)]
    proc = _polytask(args, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())["backend"] == "deepspeed"


def _eval(tiny, run_dir, *extra, nproc):
    """(exit code, printed metrics or None, {rank: sha256 of the weights it loaded}, stderr)."""
    args = ["eval", "configs/demo_cpu.yaml", "--checkpoint", str(run_dir / "checkpoints" / "latest"),
            *_overrides(tiny, run_dir, *extra)]
    proc = _polytask(args, nproc=nproc)
    printed = json.loads(proc.stdout) if proc.returncode == 0 else None
    digests = {int(r): d for r, d in _LOADED.findall(proc.stderr)}
    return proc.returncode, printed, digests, proc.stderr


@pytest.fixture(scope="module")
def zero2(tiny, tmp_path_factory):
    """A ZeRO-2 run that evaluated itself at its end; that evaluation is kept in ``train_eval``."""
    run_dir = tmp_path_factory.mktemp("zero2")
    _train(tiny, run_dir, 2)
    shutil.copytree(run_dir / "eval" / f"step_{STEPS}", run_dir / "train_eval")
    return run_dir


@pytest.fixture(scope="module")
def zero3(tiny, tmp_path_factory):
    """A ZeRO-3 run that evaluated itself at its end (on a gathered copy of the weights:
    ranks predict different images and heads, which ZeRO-3's per-module gathers cannot)."""
    run_dir = tmp_path_factory.mktemp("zero3")
    _train(tiny, run_dir, 3)
    shutil.copytree(run_dir / "eval" / f"step_{STEPS}", run_dir / "train_eval")
    return run_dir


def _same_results(run_dir):
    ours, theirs = run_dir / "eval" / f"step_{STEPS}", run_dir / "train_eval"
    results = sorted(p.name for p in theirs.glob("*_results.json"))
    assert results == sorted(p.name for p in ours.glob("*_results.json")) and results
    for name in results:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert sum(len(json.loads((theirs / name).read_text())) for name in results) > 0


def test_eval_of_a_zero2_checkpoint_reproduces_the_runs_own_evaluation(tiny, zero2):
    trained = json.loads((zero2 / "summary.json").read_text())["replica_digests"][0]
    rc, printed, digests, err = _eval(tiny, zero2, nproc=2)
    assert rc == 0, err[-6000:]
    assert digests == {0: trained, 1: trained}  # the parameters the run ended with, bit for bit
    # Same weights, same ranks, same batches: the same predictions as the run's evaluation.
    _same_results(zero2)
    expected = json.loads((zero2 / "train_eval" / "summary.json").read_text())["metrics"]
    assert {k: v for k, v in printed.items() if not k.startswith("eval/")} == {
        "step": STEPS, **{k: v for k, v in expected.items() if not k.startswith("eval/")}}

    rc, printed, digests, err = _eval(tiny, zero2, nproc=1)  # another world size than the training's
    assert rc == 0, err[-6000:]
    assert digests == {0: trained} and printed["step"] == STEPS


def test_eval_of_a_zero3_checkpoint_consolidates_the_trained_weights(tiny, zero2, zero3):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = (zero3 / "checkpoints" / "latest").resolve()
    assert sorted(p.name for p in state_dir(checkpoint).glob("*.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    ours = zero_model_state_dict(checkpoint)
    # DeepSpeed's own consolidation (unpickling with weights_only=False: our own test file).
    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="state")
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    # The same 2 steps under ZeRO-2 (unpartitioned weights): equal up to reduction order; a
    # misplaced partition would differ by the size of the weights (~1e-2), not ~1e-6.
    zero2_weights = zero_model_state_dict(zero2 / "checkpoints" / "latest")
    for name, tensor in zero2_weights.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-4, msg=name)

    trained = weights_digest(reference)
    # the run's own digests are of the gathered weights, not of ZeRO-3's empty placeholders
    assert json.loads((zero3 / "summary.json").read_text())["replica_digests"] == [trained, trained]
    for nproc in (1, 2):
        rc, printed, digests, err = _eval(tiny, zero3, nproc=nproc)
        assert rc == 0, err[-6000:]
        assert digests == dict.fromkeys(range(nproc), trained), nproc
        assert printed["step"] == STEPS
        if nproc == 2:  # the run's own end-of-run evaluation predicted exactly the same
            _same_results(zero3)


def test_eval_of_a_deepspeed_checkpoint_of_another_model_lists_the_keys(tiny, zero2):
    rc, _, _, err = _eval(tiny, zero2, "model.fpn_channels=64", nproc=1)
    assert rc == 2, err[-3000:]
    assert "checkpoint does not match this job" in err
    assert "backbone.fpn.extra_blocks.p6.bias: checkpoint [128] vs job [64]" in err
    assert "Traceback" not in err


def test_eval_of_a_deepspeed_checkpoint_with_other_tasks_names_them_before_loading(tiny, zero2):
    rc, _, _, err = _eval(tiny, zero2, "model.tasks=[detection,instance_mask,semantic,classification]", nproc=1)
    assert rc == 2, err[-3000:]
    assert ("tasks: the checkpoint has [detection, instance_mask, keypoints, semantic, classification], "
            "the config (model.tasks) [detection, instance_mask, semantic, classification]") in err
    assert "Traceback" not in err


class Payload:
    """An arbitrary class: what a malicious or foreign pickle would carry."""


def test_deepspeed_checkpoint_files_load_weights_only(zero2, tmp_path):
    copy = tmp_path / "step"
    shutil.copytree((zero2 / "checkpoints" / "latest").resolve(), copy)
    model_file = state_dir(copy) / "mp_rank_00_model_states.pt"
    states = load_file(model_file)
    torch.save({**states, "payload": Payload()}, model_file)
    with pytest.raises(CheckpointLoadError, match="Weights only load failed.*Unsupported global.*Payload"):
        zero_model_state_dict(copy)


def test_export_of_a_zero3_checkpoint_holds_the_trained_weights(tiny, zero3, tmp_path):
    # polytask export consolidates ZeRO-3's partitions in one process, into plain safetensors.
    from safetensors.torch import load_file

    args = ["export", "configs/demo_cpu.yaml", "--checkpoint", str(zero3 / "checkpoints" / "latest"),
            "--out", str(tmp_path), *_overrides(tiny, zero3)]
    proc = _polytask(args, nproc=1)
    assert proc.returncode == 0, proc.stderr[-6000:]
    trained = json.loads((zero3 / "summary.json").read_text())["replica_digests"][0]
    assert weights_digest(load_file(tmp_path / "model.safetensors")) == trained
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["checkpoint"]["backend"] == "deepspeed" and spec["weights"]["sha256"] == trained
