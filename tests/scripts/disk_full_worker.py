"""Two same-size checkpoints into a run directory on a small filesystem (argv[1], mounted
by the test): the second does not fit. Prints one JSON line of what happened."""
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer, CheckpointSaveError, write_dcp
from trainer.config import CheckpointConfig

root = Path(sys.argv[1])
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
checkpointer = Checkpointer(run_dir=root / "run", cfg=CheckpointConfig(keep_last=5), is_main=True)
state = {"w": torch.ones(400_000)}  # 1.6 MB per checkpoint
checkpointer.save(1, lambda d: write_dcp(state, d), {"backend": "ddp"})
error = None
try:
    checkpointer.save(2, lambda d: write_dcp(state, d), {"backend": "ddp"})
except CheckpointSaveError as e:
    error = str(e)


def torch_save(directory: Path) -> None:
    """As DeepSpeed writes: torch.save, which reports ENOSPC as a RuntimeError without errno."""
    directory.mkdir(parents=True)
    torch.save(state, directory / "model.pt")


torch_save_error = None
try:
    checkpointer.save(3, torch_save, {"backend": "ddp"})
except CheckpointSaveError as e:
    torch_save_error = str(e)
checkpointer.finish()
checkpoints = root / "run" / "checkpoints"
print(json.dumps({
    "error": error,
    "torch_save_error": torch_save_error,
    "listing": sorted(p.name for p in checkpoints.iterdir()),
    "latest": checkpointer.latest().name,
    "step_1_bytes": sum(f.stat().st_size for f in (checkpoints / "step_1").iterdir()),
    "free_after": shutil.disk_usage(root).free,
}))
dist.destroy_process_group()
