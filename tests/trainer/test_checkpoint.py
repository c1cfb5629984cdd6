import contextlib

import pytest

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


@contextlib.contextmanager
def _one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _varied_state():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(4.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 2, generator=g).t(),  # not contiguous
        "extra": {"step": 11, "name": "x"},
    }


def test_raw_tensor_storage_round_trips_every_dtype_and_shape(tmp_path):
    """Tensors are written as raw bytes (trainer/checkpoint_storage.py): dtype, shape and
    values come back exactly; checkpoints in DCP's own format still load."""
    import torch
    import torch.distributed.checkpoint as dcp

    from trainer.checkpoint import read_dcp, write_dcp

    with _one_rank_group():
        saved = _varied_state()
        write_dcp(saved, tmp_path / "ours")
        dcp.save(saved, checkpoint_id=str(tmp_path / "dcp_format"))  # torch.save per item
        for name in ("ours", "dcp_format"):
            loaded = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": 0, "name": ""}
                      for k, v in saved.items()}
            read_dcp(loaded, tmp_path / name)
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), (name, k)
            assert loaded["extra"] == {"step": 11, "name": "x"}, name


MARKS: list[str] = []


def _mark() -> None:
    MARKS.append("ran")


class Armed:
    """Unpickling this calls _mark(): a stand-in for code a crafted checkpoint would run."""

    def __reduce__(self):
        return (_mark, ())


def test_crafted_metadata_is_refused_without_running_it(tmp_path):
    """DCP's own reader unpickles .metadata with plain pickle; ours allows only metadata types."""
    import pickle

    import torch

    from trainer.checkpoint import CheckpointLoadError, read_dcp, write_dcp

    with _one_rank_group():
        write_dcp({"w": torch.ones(2)}, tmp_path / "ckpt")
        metadata_file = tmp_path / "ckpt" / ".metadata"
        metadata = pickle.loads(metadata_file.read_bytes())  # our own file: safe to read
        metadata.storage_meta = Armed()
        metadata_file.write_bytes(pickle.dumps(metadata))
        pickle.loads(metadata_file.read_bytes())
        assert MARKS == ["ran"]  # the file is armed: a plain pickle.load runs it
        MARKS.clear()
        with pytest.raises(CheckpointLoadError, match=r"\.metadata: refers to .*_mark"):
            read_dcp({"w": torch.zeros(2)}, tmp_path / "ckpt")
        assert MARKS == []


def test_truncated_shard_is_a_clear_error(tmp_path):
    import torch

    from trainer.checkpoint import CheckpointLoadError, read_dcp, write_dcp

    with _one_rank_group():
        write_dcp({"w": torch.ones(1000)}, tmp_path / "ckpt")
        shard = tmp_path / "ckpt" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
        with pytest.raises(CheckpointLoadError, match=r"__0_0\.distcp: truncated"):
            read_dcp({"w": torch.zeros(1000)}, tmp_path / "ckpt")


def _rewrite_items(metadata_file, change) -> None:
    """Rewrite every RawItem of our own (trusted) .metadata with ``change(item)``."""
    import pickle

    metadata = pickle.loads(metadata_file.read_bytes())
    metadata.storage_data = {k: change(v) for k, v in metadata.storage_data.items()}
    metadata_file.write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_crafted_item_paths_cannot_read_files_outside_the_checkpoint(tmp_path, where):
    """An allow-listed .metadata whose item points at /proc/self/environ (or another file
    outside the checkpoint) would otherwise load that file's bytes into the weights."""
    import dataclasses
    import os

    import torch

    from trainer.checkpoint import CheckpointLoadError, read_dcp, write_dcp

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOKEN=hunter2-" * 64)
    ckpt = tmp_path / "ckpt"
    with _one_rank_group():
        write_dcp({"w": torch.ones(4)}, ckpt)
        target = {"absolute": str(secret), "dotdot": "../secret.bin", "symlink": "link.distcp"}[where]
        if where == "symlink":
            os.symlink(secret, ckpt / "link.distcp")
        _rewrite_items(ckpt / ".metadata", lambda item: dataclasses.replace(item, relative_path=target))
        state = {"w": torch.zeros(4)}
        with pytest.raises(CheckpointLoadError, match=r"item 'w' points at .*(outside|symlink out of) the checkpoint"):
            read_dcp(state, ckpt)
        assert torch.equal(state["w"], torch.zeros(4))


@pytest.mark.parametrize("field, value", [("offset", 10**9), ("offset", -4), ("length", 10**9), ("length", 8)])
def test_crafted_offsets_and_lengths_must_stay_within_the_shard(tmp_path, field, value):
    import dataclasses

    import torch

    from trainer.checkpoint import CheckpointLoadError, read_dcp, write_dcp

    with _one_rank_group():
        write_dcp({"w": torch.ones(4), "v": torch.ones(4)}, tmp_path / "ckpt")
        _rewrite_items(tmp_path / "ckpt" / ".metadata", lambda item: dataclasses.replace(item, **{field: value}))
        with pytest.raises(CheckpointLoadError, match=r"(truncated or crafted, item|bytes cannot hold)"):
            read_dcp({"w": torch.zeros(4), "v": torch.zeros(4)}, tmp_path / "ckpt")
