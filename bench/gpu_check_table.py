"""The one table of bench/gpu_check.sh, from what its steps wrote (no torch import).

Inputs: the JSON lines of ``bench.throughput`` (one per variant) and the printed output of
``bench.step_overhead``, ``bench.balancing_speed`` and ``bench.checkpoint_save``. A figure
that cannot be found is printed as MISSING and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

MISSING = "MISSING"

# (row label, throughput variant, field, format)
THROUGHPUT_ROWS = [
    ("images/s per GPU, DDP, num_workers auto", "ddp", "images_per_s_per_rank", "{:.1f}"),
    ("images/s per GPU, DDP, num_workers 1", "ddp_workers1", "images_per_s_per_rank", "{:.1f}"),
    ("images/s per GPU, DDP, channels_last", "ddp_channels_last", "images_per_s_per_rank", "{:.1f}"),
    ("images/s per GPU, ZeRO-2", "zero2", "images_per_s_per_rank", "{:.1f}"),
    ("time/data_wait_frac, num_workers auto", "ddp", "data_wait_frac", "{:.3f}"),
    ("time/data_wait_frac, num_workers 1", "ddp_workers1", "data_wait_frac", "{:.3f}"),
    ("peak GPU memory GiB, DDP", "ddp", "peak_memory_gib", "{:.1f}"),
    ("peak GPU memory GiB, ZeRO-2", "zero2", "peak_memory_gib", "{:.1f}"),
]
# (row label, balancing_speed method, statistics column ('-' for methods without statistics))
BALANCER_ROWS = [
    ("balancer step ÷ equal_balanced: equal (fixed path)", "equal", "-"),
    ("balancer step ÷ equal_balanced: famo", "famo", "-"),
    ("balancer step ÷ equal_balanced: pcgrad, statistics features", "pcgrad", "features"),
    ("balancer step ÷ equal_balanced: pcgrad, statistics fpn", "pcgrad", "fpn"),
]


def throughput_rows(path: Path) -> list[tuple[str, str]]:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["variant"]] = row
    rows = []
    for label, variant, key, fmt in THROUGHPUT_ROWS:
        value = results.get(variant, {}).get(key)
        if value is None:
            rows.append((label, MISSING))
        elif isinstance(value, float) and math.isnan(value):
            rows.append((label, "n/a (not a GPU)"))  # peak memory on CPU
        else:
            rows.append((label, fmt.format(value)))
    return rows


def first_match(path: Path, pattern: str) -> str:
    text = path.read_text() if path.exists() else ""
    found = re.search(pattern, text, re.MULTILINE)
    return found.group(1) if found else MISSING


def balancer_rows(path: Path) -> list[tuple[str, str]]:
    # balancing_speed's table: method statistics ms/step min max /ref /ref(min) /static target ok
    text = path.read_text() if path.exists() else ""
    rows = []
    for label, method, mode in BALANCER_ROWS:
        found = re.search(rf"^{re.escape(method)}\s+{re.escape(mode)}\s+\S+\s+\S+\s+\S+\s+(\S+)", text, re.MULTILINE)
        rows.append((label, found.group(1) if found else MISSING))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where gpu_check.sh wrote its steps' outputs")
    parser.add_argument("--title", default="polytask GPU check")
    args = parser.parse_args()
    d = args.dir
    rows = throughput_rows(d / "throughput.txt")
    rows.append(("trainer step ÷ bare loop", first_match(d / "step_overhead.txt", r"ratio trainer/bare: (\S+)")))
    rows += balancer_rows(d / "balancing_speed.txt")
    rows.append(("host syncs per step, by polytask's code (list: host_syncs.txt)",
                 first_match(d / "host_syncs.txt", r"made by polytask's code: ([0-9.]+)")))
    rows.append(("checkpoint save ÷ torch.save",
                 first_match(d / "checkpoint_save.txt", r"ratio polytask/torch\.save: ([0-9.]+)")))
    width = max(len(label) for label, _ in rows)
    print(f"\n{args.title}")
    print(f"| {'measure':{width}s} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for label, value in rows:
        print(f"| {label:{width}s} | {value} |")
    missing = [label for label, value in rows if value == MISSING]
    if missing:
        print(f"missing: {missing}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
