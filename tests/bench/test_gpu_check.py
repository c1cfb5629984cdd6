"""bench/gpu_check.sh --dry-run: the GPU session's script runs end to end on CPU (tiny
model and images, gloo) and prints its table with every row filled, so that the one GPU
run it is prepared for does not fail on plumbing."""
import re
import subprocess
from pathlib import Path

import pytest

from bench.gpu_check_table import BALANCER_ROWS, THROUGHPUT_ROWS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed  # torchrun and real benches; a normal test, run by `make test`
def test_gpu_check_dry_run_prints_every_row(tmp_path):
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    table = out.stdout
    labels = [r[0] for r in THROUGHPUT_ROWS] + [r[0] for r in BALANCER_ROWS] + [
        "trainer step ÷ bare loop", "checkpoint save ÷ torch.save",
        "host syncs per step, by polytask's code (list: host_syncs.txt)"]
    for label in labels:
        row = re.search(rf"^\| {re.escape(label)}\s+\| (.+) \|$", table, re.MULTILINE)
        assert row, f"no row {label!r} in:\n{table}"
        value = row.group(1)
        if "memory" in label:
            assert value == "n/a (not a GPU)"
        else:
            assert float(value) > 0, (label, value)
    assert "DRY RUN" in table
    # The training runs were real: every variant wrote its metrics and a final checkpoint.
    for variant in ("ddp", "ddp_workers1", "ddp_channels_last", "zero2"):
        assert (tmp_path / "runs" / variant / "metrics.jsonl").is_file()
