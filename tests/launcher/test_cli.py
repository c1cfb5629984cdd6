"""The command line: config errors stop `polytask launch` before any process is spawned."""
import shlex
import subprocess
import sys

import pytest

from launcher.cli import main
from launcher.torchrun import LaunchSpec, torchrun_command
from tests.conftest import REPO, demo_source_overrides
from trainer.config import load_config

DEMO = str(REPO / "configs" / "demo_cpu.yaml")


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["trainer.max_steps=50", "run.dir=runs/try", "data.sources.1.path=elsewhere"])
    assert cfg.trainer.max_steps == 50 and cfg.run.dir == "runs/try"
    assert cfg.data.sources[1].path == "elsewhere" and cfg.data.sources[0].path.endswith("shapes_instances")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.max_step=5", "trainer.max_step: unknown key"),
        ("trainer.max_steps=five", "trainer.max_steps: expected an integer, got 'five'"),
        ("trainer.backend=horovod", "trainer.backend: expected one of"),
        ("optim.lr=-1", "optim.lr must be > 0"),
    ],
)
def test_launch_rejects_bad_overrides_before_spawning(override, expected, capsys, tmp_path):
    # run.dir points at a fresh directory: had a rank started, it would have created it.
    code = main(["launch", DEMO, "--nproc-per-node", "2", f"run.dir={tmp_path}/run", override])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_loss_weight_of_no_task_is_refused_before_spawning(demo_sources, capsys, tmp_path):
    # With model.tasks set, the config alone tells; derived from the sources, pre-flight does.
    data = [*demo_source_overrides(demo_sources), *demo_source_overrides(demo_sources, split="val", section="eval")]
    for extra in (["model.tasks=[detection,instance_mask,keypoints,semantic,classification]"], data):
        code = main(["launch", DEMO, "--nproc-per-node", "2", f"run.dir={tmp_path}/run", *extra,
                     "trainer.loss_weights.detectoin=2"])
        err = capsys.readouterr().err
        assert code == 2
        assert "trainer.loss_weights: unknown task(s) ['detectoin']" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


def test_missing_config_file_is_one_line_error(capsys, tmp_path):
    assert main(["launch", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: config file not found" in err and len(err.strip().splitlines()) == 1


def test_torchrun_command_keeps_overrides_intact():
    odd = "run.dir=/tmp/a dir/with 'quotes' && $(rm -rf x)"
    cmd = torchrun_command(LaunchSpec(nproc_per_node=2), "c.yaml", [odd, "x=1"])
    assert cmd[-2:] == [odd, "x=1"]  # one argv item each, never a shell string
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd
    multi = torchrun_command(LaunchSpec(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node1:29500"), "c.yaml", [])
    assert "--nnodes=2" in multi and "--rdzv-endpoint=node1:29500" in multi and "--node-rank=1" in multi
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        LaunchSpec(nnodes=2)


def test_python_dash_m_launcher_dry_run(demo_sources):
    sources = [*demo_source_overrides(demo_sources), *demo_source_overrides(demo_sources, split="val", section="eval")]
    proc = subprocess.run([sys.executable, "-m", "launcher", "launch", DEMO, "--nproc-per-node", "2",
                           "--dry-run", *sources, "trainer.max_steps=3"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert argv[-(len(sources) + 5):] == ["-m", "launcher", "train", DEMO, *sources, "trainer.max_steps=3"]
