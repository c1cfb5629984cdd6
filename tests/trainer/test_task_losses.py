from tests.conftest import SCRIPTS, run_torchrun


def test_global_normalisation_equals_big_batch_gradient_on_two_ranks():
    proc = run_torchrun([str(SCRIPTS / "reduce_losses_worker.py")], nproc=2, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
