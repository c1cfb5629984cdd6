"""Problems with the data and the evaluation set-up are found by `polytask launch` (also
with --dry-run and --print-run-dir) before torchrun, one line each, and read the same when
a rank finds them."""
import json
import shutil
import subprocess
import sys

import pytest

from launcher.cli import main
from tests.conftest import REPO, demo_source_overrides

DEMO = str(REPO / "configs" / "demo_cpu.yaml")


def _data(demo_sources):
    return [*demo_source_overrides(demo_sources), *demo_source_overrides(demo_sources, split="val", section="eval")]


def _launch_errors(capsys, tmp_path, *args, mode="--dry-run", nproc=2):
    code = main(["launch", DEMO, f"--nproc-per-node={nproc}", mode, f"run.dir={tmp_path}/run", *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert not (tmp_path / "run").exists()
    return [line for line in captured.err.splitlines() if line.strip()]


def _copy_source(src, dst, **manifest_changes):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, change in manifest_changes.items():
        manifest[key] = change(manifest[key]) if callable(change) else change
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("mode", ["--dry-run", "--print-run-dir"])
def test_missing_sources_and_a_best_metric_typo_one_line_each(demo_sources, tmp_path, capsys, mode):
    errors = _launch_errors(capsys, tmp_path, *_data(demo_sources), f"data.sources.1.path={tmp_path}/gone",
                            f"eval.sources.2.path={tmp_path}/val_gone", mode=mode)
    assert len(errors) == 2, errors
    assert "DataConfig.sources[1].path" in errors[0] and f"{tmp_path}/gone" in errors[0]
    assert "eval.sources[2].path" in errors[1] and f"{tmp_path}/val_gone" in errors[1]
    # The sources are fine; the metric is misspelt (AP5O: a letter O).
    errors = _launch_errors(capsys, tmp_path, *_data(demo_sources), "eval.best_metric=val/shapes_instances/bbox/AP5O")
    assert len(errors) == 1 and "eval.best_metric 'val/shapes_instances/bbox/AP5O' is not a metric" in errors[0]
    assert "val/shapes_instances/bbox/AP50" in errors[0]


def test_best_metric_without_eval_sources(demo_sources, tmp_path, capsys):
    errors = _launch_errors(capsys, tmp_path, *demo_source_overrides(demo_sources), "eval.sources=[]")
    assert len(errors) == 1 and "eval.best_metric is 'val/shapes_instances/bbox/AP' but eval.sources is empty" in errors[0]


def test_sources_smaller_than_the_reader_slots_are_accepted_and_empty_ones_named(demo_sources, tmp_path, capsys):
    # Issue 14 item 5: 24 training images per source, 32 ranks: not even one sample per rank
    # and epoch, yet the run can start (each such source is dealt out several epochs at a time).
    code = main(["launch", DEMO, "--nproc-per-node=32", "--dry-run", f"run.dir={tmp_path}/run", *_data(demo_sources),
                 "data.readers_per_rank=1"])
    assert code == 0, capsys.readouterr().err
    # A source without a sample is the one size that cannot train.
    empty = _copy_source(demo_sources / "train" / "shapes_classes", tmp_path / "empty",
                         shards=lambda shards: [{**s, "num_samples": 0} for s in shards])
    errors = _launch_errors(capsys, tmp_path, *_data(demo_sources), f"data.sources.3.path={empty}")
    assert errors == [f"polytask: error: {DEMO}: DataConfig.sources[3].path: source 'shapes_classes' ({empty}) has "
                      f"no samples"], errors


def test_incompatible_keypoint_layouts_are_named(demo_sources, tmp_path, capsys):
    other = _copy_source(demo_sources / "train" / "shapes_keypoints", tmp_path / "other_keypoints",
                         name="other_keypoints", keypoints=lambda k: {**k, "names": [n + "_x" for n in k["names"]]})
    sources = "[{path: %s}, {path: %s}]" % (demo_sources / "train" / "shapes_keypoints", other)
    errors = _launch_errors(capsys, tmp_path, f"data.sources={sources}", "eval.sources=[]", "eval.best_metric=null")
    assert len(errors) == 1 and "source 'other_keypoints': keypoint schema" in errors[0], errors


def test_missing_ground_truth_is_named_and_the_ranks_say_the_same(demo_sources, tmp_path, capsys):
    val = _copy_source(demo_sources / "val" / "shapes_instances", tmp_path / "val_instances")
    (val / "annotations.json").unlink()  # the source's own copy of its ground truth is gone
    overrides = [*demo_source_overrides(demo_sources), f"eval.sources=[{{path: {val}}}]", "wandb.mode=disabled",
                 "trainer.max_steps=1"]
    errors = _launch_errors(capsys, tmp_path, *overrides)
    assert len(errors) == 1, errors
    assert "eval.sources[0].path" in errors[0] and str(val / "annotations.json") in errors[0]
    # A rank started without the launcher stops at start-up with the same line.
    message = errors[0].split(": ", 3)[3]  # after "polytask: error: <config>: "
    proc = subprocess.run([sys.executable, "-m", "launcher", "train", DEMO, f"run.dir={tmp_path}/rank_run", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "rank_run" / "checkpoints").exists()  # it did not train


def test_a_resume_checkpoint_trained_with_another_box_activation_is_named_before_the_ranks(demo_sources, tmp_path,
                                                                                          capsys):
    """An older run directory (its checkpoint records no box activation: torchvision's ReLU)
    under the new softplus default: one line with the setting to use, before torchrun."""
    step = tmp_path / "old" / "checkpoints" / "step_300"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "meta.json").write_text(json.dumps({"step": 300, "backend": "ddp", "world_size": 2}))
    (step.parent / "latest").symlink_to("step_300")
    code = main(["launch", DEMO, "--nproc-per-node=2", "--dry-run", f"run.dir={tmp_path}/old", *_data(demo_sources)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("model.fcos_box_activation: the checkpoint's boxes were trained with 'relu', the config has 'softplus'; "
            "set model.fcos_box_activation=relu") in err
    assert main(["launch", DEMO, "--nproc-per-node=2", "--dry-run", f"run.dir={tmp_path}/old", *_data(demo_sources),
                 "model.fcos_box_activation=relu"]) == 0
