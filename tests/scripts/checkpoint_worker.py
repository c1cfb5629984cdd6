"""torchrun worker: DCP checkpoints are atomic, `latest` only moves to complete ones,
keep_last prunes, and loading restores the exact parameters and optimizer state."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from trainer.checkpoint import Checkpointer, CheckpointLoadError, read_dcp, write_dcp
from trainer.config import CheckpointConfig

run_dir = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)))
opt = torch.optim.AdamW(model.parameters(), lr=0.1)


def train_one():
    opt.zero_grad()
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()


def state():
    m, o = get_state_dict(model, opt)
    return {"model": m, "optimizer": o, "train": {"step": 0}}


ckpt = Checkpointer(run_dir=run_dir, cfg=CheckpointConfig(keep_last=2), is_main=rank == 0)
assert ckpt.latest() is None
train_one()
ckpt.save(1, lambda d: write_dcp(state(), d), {"note": "one"})
saved = {k: v.clone() for k, v in model.module.state_dict().items()}

# A save that crashed halfway: a stale partial directory, never pointed at.
if rank == 0:
    partial = run_dir / "checkpoints" / "step_2.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
dist.barrier()
assert ckpt.latest().name == "step_1"

train_one()
assert not all(torch.equal(saved[k], v) for k, v in model.module.state_dict().items())
s = state()
read_dcp(s, ckpt.latest())
meta = ckpt.read_meta(ckpt.latest())
set_state_dict(model, opt, model_state_dict=s["model"], optim_state_dict=s["optimizer"])
assert meta["step"] == 1 and meta["note"] == "one"
for k, v in model.module.state_dict().items():
    assert torch.equal(saved[k], v), k

for step in (2, 3, 4):
    train_one()
    ckpt.save(step, lambda d: write_dcp(state(), d), {})
ckpt.finish()  # old checkpoints are deleted in the background; this waits for it
dist.barrier()
names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
assert names == ["latest", "step_3", "step_4"], names  # the stale partial was cleaned by save(2)
assert ckpt.latest().name == "step_4"
assert os.path.islink(run_dir / "checkpoints" / "latest")

# A checkpoint of another model: one error listing the mismatching keys.
other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
try:
    read_dcp({"model": other.state_dict()}, run_dir / "checkpoints" / "step_4")
except CheckpointLoadError as e:
    msg = str(e)
    assert "does not match this job" in msg, msg
    assert "missing in checkpoint (2): model.2.bias, model.2.weight" in msg, msg
    assert "model.0.weight: checkpoint [8, 4] vs job [16, 4]" in msg, msg
else:
    raise AssertionError("another model's checkpoint loaded")
dist.barrier()  # both ranks are done before either tears the group down
print(f"rank {rank} ok")
dist.destroy_process_group()
