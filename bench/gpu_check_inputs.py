"""Synthetic training sources at a given image size for bench/gpu_check.sh: the demo's four
sources (boxes + instance masks, keypoints, semantic masks, image classes) drawn at
``--image-size`` and converted with the ordinary converters (no torch import: seconds).

    python -m bench.gpu_check_inputs --out /tmp/check/data --image-size 800 --images 96
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data_pipelines.demo.shards import convert_demo
from data_pipelines.demo.synthetic import DEMO_TASKS, generate_demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/raw and OUT/shards/train/<source>")
    parser.add_argument("--image-size", type=int, required=True, help="side of the square images")
    parser.add_argument("--images", type=int, required=True, help="training images per source")
    parser.add_argument("--workers", type=int, default=4, help="conversion threads per source")
    args = parser.parse_args()
    raw = generate_demo_data(args.out / "raw", num_images={"train": args.images}, image_size=args.image_size)
    convert_demo(raw, args.out / "shards", workers=args.workers)
    for source in DEMO_TASKS:  # the paths, in configs/demo_cpu.yaml's order, for the script
        print(args.out / "shards" / "train" / source)


if __name__ == "__main__":
    main()
