from tests.conftest import SCRIPTS, run_torchrun


def test_atomic_sharded_checkpoints_on_two_ranks(tmp_path):
    proc = run_torchrun([str(SCRIPTS / "checkpoint_worker.py"), str(tmp_path)], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    step = tmp_path / "checkpoints" / "step_4"
    assert (step / ".metadata").is_file() and (step / "meta.json").is_file()
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
