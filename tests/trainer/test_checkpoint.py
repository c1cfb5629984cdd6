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
    """Tensors are written as raw bytes (trainer/checkpoint/raw_storage.py): dtype, shape and
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


def _saved_steps(run_dir, steps, *, keep_last=5):
    """Real checkpoints of ``steps`` written by a Checkpointer (call inside _one_rank_group)."""
    import torch

    from trainer.checkpoint import Checkpointer, write_dcp
    from trainer.config import CheckpointConfig

    checkpointer = Checkpointer(run_dir=run_dir, cfg=CheckpointConfig(keep_last=keep_last), is_main=True)
    for step in steps:
        checkpointer.save(step, lambda d, step=step: write_dcp({"w": torch.full((4,), float(step))}, d),
                          {"backend": "ddp"})
    checkpointer.finish()
    return checkpointer


@pytest.mark.parametrize("damage, problem", [
    ("missing_target", "points at step_40, which does not exist"),
    ("no_meta", "points at step_40, which is incomplete (no meta.json)"),
    ("no_metadata", "points at step_40, which is incomplete (no .metadata)"),
    ("no_link", "is missing"),
])
def test_broken_latest_resumes_from_the_newest_complete_step(tmp_path, caplog, damage, problem):
    """Issue 15 items 3 and 4: `latest` lost or pointing at an incomplete step must not read as
    "no checkpoint" (the run started over and overwrote step_30): the newest complete step,
    with a warning; an incomplete step and a stale partial are passed over."""
    import logging
    import os
    import shutil

    from trainer.checkpoint import Checkpointer
    from trainer.config import CheckpointConfig

    with _one_rank_group():
        _saved_steps(tmp_path, [10, 20, 30, 40])
    root = tmp_path / "checkpoints"
    (root / "step_50.partial").mkdir()  # a save killed midway
    os.remove(root / "step_20" / "meta.json")  # older damage: never chosen over step_30 anyway
    if damage == "missing_target":
        shutil.rmtree(root / "step_40")
    elif damage == "no_meta":
        os.remove(root / "step_40" / "meta.json")
    elif damage == "no_metadata":
        os.remove(root / "step_40" / ".metadata")
    else:
        shutil.rmtree(root / "step_40")
        os.remove(root / "latest")
    caplog.set_level(logging.WARNING, logger="trainer.checkpoint")
    found = Checkpointer(run_dir=tmp_path, cfg=CheckpointConfig(), is_main=False).latest()
    assert found == root / "step_30"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{root / 'latest'} {problem}; resuming from {root / 'step_30'}" in warning, warning


def test_only_incomplete_checkpoints_are_an_error_naming_them(tmp_path):
    """Checkpoints there but none complete: refuse, naming each, rather than start over."""
    import os

    from trainer.checkpoint import Checkpointer, CheckpointLoadError
    from trainer.config import CheckpointConfig

    with _one_rank_group():
        _saved_steps(tmp_path, [10, 20])
    root = tmp_path / "checkpoints"
    os.remove(root / "step_10" / "meta.json")
    (root / "step_20" / "meta.json").write_text("{torn")
    with pytest.raises(CheckpointLoadError) as info:
        Checkpointer(run_dir=tmp_path, cfg=CheckpointConfig(), is_main=False).latest()
    message = str(info.value)
    assert "points at step_20, which is incomplete (unreadable meta.json" in message, message
    assert "step_10 (no meta.json)" in message and "not starting over" in message, message
    # A run directory without step directories is a fresh run, not an error.
    assert Checkpointer(run_dir=tmp_path / "fresh", cfg=CheckpointConfig(), is_main=True).latest() is None


class _DevFullWriter:
    """A RawTensorWriter whose shard files are /dev/full: every write of them fails with the
    kernel's own ENOSPC, as on a full disk (.metadata and the directory are real files)."""

    def __new__(cls, path):
        import contextlib

        from trainer.checkpoint.raw_storage import RawTensorWriter

        writer = RawTensorWriter(path)
        real_create_stream = writer.fs.create_stream

        @contextlib.contextmanager
        def create_stream(file, mode):
            if str(file).endswith(".distcp"):
                with open("/dev/full", mode) as stream:
                    yield stream
            else:
                with real_create_stream(file, mode) as stream:
                    yield stream

        writer.fs.create_stream = create_stream
        return writer


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_a_save_is_one_line_and_removes_the_partial(tmp_path, mode):
    """Issue 15 item 8 (ENOSPC from /dev/full at the storage writer; see the tmpfs test below
    for a real full filesystem): one line with the path, bytes needed and free; the partial is
    removed and `latest` still points at the previous checkpoint."""
    import os
    import shutil

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from trainer.checkpoint import CheckpointSaveError

    if not os.access("/dev/full", os.W_OK):
        pytest.skip("no writable /dev/full")
    state = {"w": torch.ones(2**18)}  # 1 MiB: larger than any write buffer
    with _one_rank_group():
        checkpointer = _saved_steps(tmp_path, [1])
        root = tmp_path / "checkpoints"
        if mode == "sync":
            write = lambda d: dcp.save(state, storage_writer=_DevFullWriter(str(d)))  # noqa: E731
        else:
            group = dist.new_group(backend="gloo")
            write = lambda d: dcp.async_save(state, storage_writer=_DevFullWriter(str(d)), process_group=group)  # noqa: E731
        with pytest.raises(CheckpointSaveError) as info:
            checkpointer.save(2, write, {"backend": "ddp"})
            checkpointer.finish()  # async: the failed write surfaces when it is finalised
        message = str(info.value)
        assert "\n" not in message
        size_1 = sum(f.stat().st_size for f in (root / "step_1").iterdir())
        assert message.startswith(f"checkpoint step_2: No space left on device writing {root / 'step_2.partial'}: "
                                  f"needs about {size_1} bytes"), message
        assert "MiB, the size of step_1), has " in message and "checkpoints/latest still points at step_1" in message
        free = int(message.split(", has ")[1].split(" bytes")[0])
        assert abs(free - shutil.disk_usage(root).free) < 2**26, message  # the same filesystem, a moment apart
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
        assert checkpointer.latest() == root / "step_1"


def _userns_tmpfs_works(where) -> bool:
    import subprocess

    try:
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               'mount -t tmpfs -o size=1m tmpfs "$0"', str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """Issue 15 item 8 on a real 3 MiB tmpfs (mounted in a user namespace, no root needed):
    step_1 (about 1.6 MiB) fits, step_2 of the same size does not."""
    import json
    import subprocess
    import sys

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if not _userns_tmpfs_works(mount):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -Urm)")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           'mount -t tmpfs -o size=3m tmpfs "$0" && exec "$1" "$2" "$0"',
                           str(mount), sys.executable, str(SCRIPTS / "disk_full_worker.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    message = report["error"]
    assert "\n" not in message
    assert message.startswith(f"checkpoint step_2: No space left on device writing {mount}/run/checkpoints/"
                              f"step_2.partial"), message
    assert f"needs about {report['step_1_bytes']} bytes" in message, message
    assert f"has {report['free_after']} bytes (" in message and "after removing the partial) free;" in message, message
    # torch.save (DeepSpeed's writer) reports it as a RuntimeError without errno: still one line.
    message = report["torch_save_error"]
    assert "\n" not in message and message.startswith(
        f"checkpoint step_3: the disk is full writing {mount}/run/checkpoints/step_3.partial (RuntimeError: "), message
    assert f"needs about {report['step_1_bytes']} bytes" in message, message
    assert f"has {report['free_after']} bytes (" in message, message  # its open file was released first
    assert report["listing"] == ["latest", "step_1"] and report["latest"] == "step_1"
    assert report["free_after"] > report["step_1_bytes"] // 2  # the partial's space came back


def test_checkpoints_written_before_the_checkpoint_package_still_load(tmp_path, monkeypatch):
    """Until 2026-12 RawItem lived in trainer/checkpoint_storage.py, and .metadata pickles
    name it there: those checkpoints load exactly."""
    import dataclasses
    import sys
    import types

    import torch

    from trainer.checkpoint import read_dcp, write_dcp
    from trainer.checkpoint.raw_storage import RawItem

    old_module = types.ModuleType("trainer.checkpoint_storage")
    monkeypatch.setitem(sys.modules, "trainer.checkpoint_storage", old_module)
    OldRawItem = dataclasses.make_dataclass("RawItem", [(f.name, f.type, f) for f in dataclasses.fields(RawItem)],
                                            frozen=True, namespace={"__module__": "trainer.checkpoint_storage"})
    old_module.RawItem = OldRawItem
    with _one_rank_group():
        saved = _varied_state()
        write_dcp(saved, tmp_path / "old")
        _rewrite_items(tmp_path / "old" / ".metadata", lambda item: OldRawItem(**dataclasses.asdict(item)))
        assert b"trainer.checkpoint_storage" in (tmp_path / "old" / ".metadata").read_bytes()
        monkeypatch.delitem(sys.modules, "trainer.checkpoint_storage")
        loaded = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": 0, "name": ""}
                  for k, v in saved.items()}
        read_dcp(loaded, tmp_path / "old")
        for k, v in saved.items():
            if isinstance(v, torch.Tensor):
                assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def _train_with_best(run_dir, *, keep_last, saves, best_steps):
    """The loop's order at each saved step: save (which prunes), then, if the evaluation of that
    step is the best so far, ``mark_best``; then ``finish``. Returns what is left on disk."""
    import torch

    from trainer.checkpoint import Checkpointer, write_dcp
    from trainer.config import CheckpointConfig

    with _one_rank_group():
        checkpointer = Checkpointer(run_dir=run_dir, cfg=CheckpointConfig(keep_last=keep_last), is_main=True)
        for step in saves:
            checkpointer.save(step, lambda d, step=step: write_dcp({"w": torch.full((4,), float(step))}, d),
                              {"backend": "ddp"})
            if step in best_steps:
                checkpointer.mark_best(step)
        checkpointer.finish()
    root = run_dir / "checkpoints"
    left = sorted((p.name for p in root.iterdir() if p.name.startswith("step_")), key=lambda n: int(n[5:]))
    return left, (root / "best").resolve().name


def test_best_moving_forward_prunes_the_old_best(tmp_path):
    """Issue 14 item 4: keep_last 1, evaluation every 30 steps: the save of step 60 prunes while
    `best` still spares step_30; once `best` moves to step_60, step_30 must go too."""
    left, best = _train_with_best(tmp_path, keep_last=1, saves=[30, 60], best_steps={30, 60})
    assert (left, best) == (["step_60"], "step_60")


def test_best_on_an_old_step_is_kept_beside_the_newest(tmp_path):
    left, best = _train_with_best(tmp_path, keep_last=1, saves=[30, 60, 90], best_steps={30})
    assert (left, best) == (["step_30", "step_90"], "step_30")


@pytest.mark.parametrize("best_steps, expected", [
    ({30, 300}, ["step_270", "step_300"]),  # best moves to the final step: the old best goes
    ({30, 120}, ["step_120", "step_270", "step_300"]),  # best stays old: keep_last + best
])
def test_end_of_run_leaves_keep_last_steps_plus_best(tmp_path, best_steps, expected):
    """The issue's run: best at step 30 until the final evaluation; afterwards exactly
    keep_last steps plus best are on disk."""
    left, best = _train_with_best(tmp_path, keep_last=2, saves=list(range(30, 301, 30)), best_steps=best_steps)
    assert left == expected and best == f"step_{max(best_steps)}"
