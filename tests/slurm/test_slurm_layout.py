"""What `polytask launch --slurm` derives from SLURM_* variables, and the checkpoint-now
flag on its own: no cluster needed (the cluster tests are in test_slurm_jobs.py)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from launcher import slurm
from launcher.cli import main
from tests.conftest import REPO, demo_source_overrides
from trainer.config_loading import ConfigError
from trainer.preemption import PreemptionFlag, slurm_job_info

DEMO = str(REPO / "configs" / "demo_cpu.yaml")
JOB_ENV = {
    "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "exp", "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu02",
    "SLURM_RESTART_COUNT": "3", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": "/shared/me",
}


def test_job_from_environment():
    job = slurm.SlurmJob.from_env(JOB_ENV)
    assert (job.job_id, job.job_name, job.num_nodes, job.node_id, job.node_name) == (4321, "exp", 2, 1, "gpu02")
    assert (job.restart_count, job.gpus_on_node, job.submit_dir) == (3, 4, Path("/shared/me"))
    assert slurm.SlurmJob.from_env({"SLURM_JOB_ID": "7"}).gpus_on_node is None  # a CPU job
    with pytest.raises(ConfigError, match="not inside a Slurm job"):
        slurm.SlurmJob.from_env({})


def test_port_comes_from_the_job_id():
    assert slurm.rdzv_port(4321) == slurm.rdzv_port(4321) == 24321
    # Below Linux's ephemeral ports (32768+), where outgoing connections could hold it.
    assert all(20000 <= slurm.rdzv_port(j) < 30000 for j in (0, 9999, 10000, 123456789))


def test_ranks_per_node_from_gpus_unless_given():
    job = slurm.SlurmJob.from_env(JOB_ENV)
    assert slurm.launch_spec(job, nproc_per_node=None, rdzv_endpoint="h:1").nproc_per_node == 4
    assert slurm.launch_spec(job, nproc_per_node=2, rdzv_endpoint="h:1").nproc_per_node == 2
    cpu_job = slurm.SlurmJob.from_env({**JOB_ENV, "SLURM_GPUS_ON_NODE": ""})
    spec = slurm.launch_spec(cpu_job, nproc_per_node=None, rdzv_endpoint="h:1")
    assert (spec.nproc_per_node, spec.nnodes, spec.rdzv_id, spec.max_restarts) == (1, 2, "slurm-4321", 0)


def test_run_dir_from_the_config_else_from_the_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = slurm.SlurmJob.from_env(JOB_ENV)
    config = tmp_path / "exp.yaml"
    config.write_text("run:\n  dir: runs/mine\n")
    assert slurm.run_dir(config, [], job) == tmp_path / "runs" / "mine"  # the config's, made absolute
    assert slurm.run_dir(config, ["run.dir=/x/y"], job) == Path("/x/y")
    config.write_text("run:\n  seed: 1\n")
    assert slurm.run_dir(config, [], job) == Path("/shared/me/runs/exp-4321")  # same id after a requeue


def test_a_requeued_job_resumes_its_own_run(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\ncheckpoint:\n  resume: never\n")
    first = slurm.SlurmJob.from_env({**JOB_ENV, "SLURM_RESTART_COUNT": "0"})
    again = slurm.SlurmJob.from_env({**JOB_ENV, "SLURM_RESTART_COUNT": "1"})
    assert slurm.job_overrides(config, [], first) == [f"run.dir={tmp_path / 'run'}"]
    assert slurm.job_overrides(config, [], again) == [f"run.dir={tmp_path / 'run'}"]  # nothing saved yet
    (tmp_path / "run" / "checkpoints" / "step_3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").symlink_to("step_3")
    assert slurm.job_overrides(config, [], first) == [f"run.dir={tmp_path / 'run'}"]
    assert slurm.job_overrides(config, [], again) == [f"run.dir={tmp_path / 'run'}", "checkpoint.resume=auto"]


def test_cli_prints_the_run_dir_and_passes_it_to_the_ranks(monkeypatch, capsys, tmp_path, demo_sources):
    for key, value in JOB_ENV.items():
        monkeypatch.setenv(key, value)
    odd = f"run.dir={tmp_path}/a b/'c' $(d)"
    # The launcher checks the data for the job's 8 ranks before it answers.
    data = [*demo_source_overrides(demo_sources), *demo_source_overrides(demo_sources, split="val", section="eval"),
            "data.readers_per_rank=1"]
    assert main(["launch", "--slurm", "--print-run-dir", DEMO, *data, odd]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/a b/'c' $(d)\n"
    assert main(["launch", "--slurm", "--rdzv-endpoint", "gpu01:24321", "--dry-run", DEMO, *data, odd]) == 0
    cmd = shlex.split(capsys.readouterr().out.splitlines()[-1])
    assert "--nproc-per-node=4" in cmd and "--nnodes=2" in cmd and "--rdzv-endpoint=gpu01:24321" in cmd
    assert cmd[-2:] == [odd, f"run.dir={tmp_path}/a b/'c' $(d)"]


def test_cli_outside_slurm_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["launch", "--slurm", DEMO]) == 2
    assert "not inside a Slurm job" in capsys.readouterr().err


def test_preemption_flag_on_one_process(tmp_path):
    flag = PreemptionFlag(tmp_path, local_rank=0)
    assert not flag.requested()
    flag.request.write_text("1\n")
    assert flag.requested()
    assert not PreemptionFlag(tmp_path, local_rank=1).requested()  # one reader per node
    flag.acknowledge(7)
    assert flag.done.read_text() == "7\n" and not flag.request.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["preempt.done"]  # no temporary file left


def test_slurm_job_info():
    assert slurm_job_info({}) == {}
    info = slurm_job_info(JOB_ENV)
    assert info == {"job_id": "4321", "restart_count": 3, "nodelist": "gpu[01-02]", "num_nodes": 2}
