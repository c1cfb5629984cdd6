from tests.conftest import SCRIPTS, run_torchrun


def test_atomic_sharded_checkpoints_on_two_ranks(tmp_path):
    proc = run_torchrun([str(SCRIPTS / "checkpoint_worker.py"), str(tmp_path)], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    step = tmp_path / "checkpoints" / "step_4"
    assert (step / ".metadata").is_file() and (step / "meta.json").is_file()
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


class Payload:
    """An arbitrary class: what a malicious or foreign pickle would carry."""


def test_non_tensor_values_load_with_weights_only(tmp_path):
    """DCP unpickles non-tensor values with weights_only=False by default; ours refuses
    arbitrary objects with an error naming the checkpoint (one process, world size 1)."""
    import torch
    import torch.distributed as dist

    from trainer.checkpoint import CheckpointLoadError, read_dcp, write_dcp

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        write_dcp({"w": torch.ones(2), "extra": {"obj": Payload(), "step": 3}}, tmp_path / "ckpt")
        plain = {"w": torch.zeros(2), "extra": {"step": 0}}
        read_dcp(plain, tmp_path / "ckpt")  # plain values load
        assert plain["extra"]["step"] == 3 and torch.equal(plain["w"], torch.ones(2))
        try:
            read_dcp({"w": torch.zeros(2), "extra": {"obj": None}}, tmp_path / "ckpt")
        except CheckpointLoadError as e:
            assert "ckpt: cannot load" in str(e) and "Weights only load failed" in str(e), e
        else:
            raise AssertionError("a pickled object loaded without weights_only protection")
    finally:
        dist.destroy_process_group()
