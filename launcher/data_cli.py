"""``polytask data ...``: make the demo data and convert sources to shards.

Wiring, in ``launcher/cli.py``::

    data = subparsers.add_parser("data", help="prepare data sources")
    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    ...
    return run_data_command(args)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipelines.bad_data import BAD_SAMPLE_POLICIES, TooManyBadSamples
from data_pipelines.conversion import (
    COCO_TASKS,
    DEFAULT_BAD_SAMPLE_POLICY,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_ORDER,
    DEFAULT_ORDER_SEED,
    DEFAULT_SHARD_MAX_BYTES,
    DEFAULT_SHARD_MAX_SAMPLES,
    DEFAULT_WORKERS,
    SKIPPED_NAME,
    convert_coco,
    convert_image_folder,
    convert_semantic,
)
from data_pipelines.demo.shards import convert_demo
from data_pipelines.manifest import MANIFEST_NAME, SAMPLE_ORDERS
from data_pipelines.demo.synthetic import DEFAULT_NUM_IMAGES, generate_demo_data


def add_data_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``convert`` to the sub-parsers of ``polytask data``."""
    demo = subparsers.add_parser("demo", help="generate the procedural demo sources and convert them to shards")
    demo.add_argument(
        "--out", type=Path, default=Path("data/demo"), help="raw data goes to OUT/raw, shards to OUT/<split>/<source>"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-images", type=int, default=DEFAULT_NUM_IMAGES["train"], help="images per source")
    demo.add_argument("--val-images", type=int, default=DEFAULT_NUM_IMAGES["val"], help="images per source")
    demo.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    demo.set_defaults(data_run=_run_demo)

    convert = subparsers.add_parser("convert", help="convert a source in its native format to shards + manifest")
    formats = convert.add_subparsers(dest="source_format", required=True)
    coco = formats.add_parser("coco", help="COCO instances / person-keypoints json")
    coco.add_argument("--images", type=Path, required=True, help="directory the json's file_names are relative to")
    coco.add_argument("--annotations", type=Path, required=True, help="the COCO json")
    coco.add_argument("--tasks", nargs="+", choices=COCO_TASKS, required=True)
    coco.add_argument(
        "--keypoint-sigmas", type=_float_list, metavar="S1,S2,...",
        help="OKS sigmas for keypoint AP, one per keypoint in the category's order; default: the category's "
        "'sigmas', else COCO's official ones for COCO's 17 person keypoints, else 0.05 each (with a warning)",
    )
    coco.set_defaults(data_run=_run_convert_coco)
    semantic = formats.add_parser("semantic", help="images + one-channel PNG masks (VOC style)")
    semantic.add_argument("--images", type=Path, required=True)
    semantic.add_argument("--masks", type=Path, required=True)
    semantic.add_argument("--classes", type=Path, required=True, help="JSON list of class names, index = pixel value")
    semantic.set_defaults(data_run=_run_convert_semantic)
    folder = formats.add_parser(
        "imagefolder", help="ROOT/<class_name>/<image>, or images with several named labels from a CSV (--labels)")
    folder.add_argument("--root", type=Path, required=True)
    folder.add_argument(
        "--labels", type=Path,
        help="a CSV 'file,<label>,<label>...' (file relative to --root; an empty cell: not labelled): several named "
        "image labels per image, each a classification task of its own (e.g. weather, daytime)")
    folder.set_defaults(data_run=_run_convert_image_folder)
    yolo = formats.add_parser(
        "yolo", help="Ultralytics YOLO txt labels (boxes, segment polygons, pose keypoints) + data.yaml")
    yolo.add_argument(
        "--data", type=Path, required=True, help="the dataset's data.yaml (names, kpt_shape, flip_idx, splits)")
    yolo.add_argument("--split", required=True, help="the data.yaml key listing the images: train, val, test, ...")
    yolo.add_argument(
        "--tasks", nargs="+", choices=COCO_TASKS, required=True,
        help="detection (boxes, or polygons' extents), instance_mask (polygon lines), keypoints (needs kpt_shape)",
    )
    yolo.add_argument(
        "--root", type=Path,
        help="dataset root the split paths are relative to, replacing data.yaml's 'path' (which must stay inside "
        "data.yaml's directory); the split's files must lie inside it",
    )
    yolo.add_argument(
        "--keypoint-sigmas", type=_float_list, metavar="S1,S2,...",
        help="OKS sigmas for keypoint AP, one per keypoint; default: COCO's official ones for COCO's 17 person "
        "keypoints (flip_idx as COCO's), else 0.05 each (with a warning)",
    )
    yolo.set_defaults(data_run=_run_convert_yolo)
    for parser in (coco, semantic, folder, yolo):
        parser.add_argument("--out", type=Path, required=True, help="directory for the shards and manifest.json")
        parser.add_argument("--name", required=True, help="source name (manifest name, shard prefix)")
        parser.add_argument("--shard-max-samples", type=int, default=DEFAULT_SHARD_MAX_SAMPLES)
        parser.add_argument("--shard-max-bytes", type=int, default=DEFAULT_SHARD_MAX_BYTES)
        parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
        parser.add_argument(
            "--order", choices=SAMPLE_ORDERS, default=DEFAULT_ORDER,
            help="shuffled (default): write samples in a seeded random order, so that no shard holds one class of "
            "a sorted source; original: in the input's order (both recorded in the manifest)",
        )
        parser.add_argument("--order-seed", type=int, default=DEFAULT_ORDER_SEED, help="seed of --order shuffled")
        parser.add_argument(
            "--bad-sample-policy", choices=BAD_SAMPLE_POLICIES, default=DEFAULT_BAD_SAMPLE_POLICY,
            help="raise: stop at the first bad image or annotation; skip: leave bad records out, "
            f"list them in OUT/{SKIPPED_NAME}, fail past --max-bad-fraction",
        )
        parser.add_argument(
            "--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
            help="with --bad-sample-policy skip: fail (writing nothing) when more of the records are bad",
        )


def run_data_command(args: argparse.Namespace) -> int:
    """Run the parsed ``polytask data`` command; returns the process exit code.

    Bad input (missing files, malformed annotations, too many bad records under
    ``--bad-sample-policy skip``) is reported on stderr as one line naming the file,
    with exit code 1, instead of a traceback.
    """
    try:
        return args.data_run(args)
    except (FileNotFoundError, ValueError, TooManyBadSamples) as e:
        print(f"polytask data: error: {e}", file=sys.stderr)
        return 1


def _run_demo(args: argparse.Namespace) -> int:
    num_images = {"train": args.train_images, "val": args.val_images}
    raw = generate_demo_data(args.out / "raw", seed=args.seed, num_images=num_images)
    manifests = convert_demo(raw, args.out, workers=args.workers)
    for split, sources in manifests.items():
        for source, manifest in sources.items():
            print(f"{split:5s} {source:18s} {manifest.num_samples:5d} samples  {Path(manifest.root) / MANIFEST_NAME}")
    return 0


def _shard_options(args: argparse.Namespace) -> dict:
    return {
        "name": args.name,
        "shard_max_samples": args.shard_max_samples,
        "shard_max_bytes": args.shard_max_bytes,
        "workers": args.workers,
        "bad_sample_policy": args.bad_sample_policy,
        "max_bad_fraction": args.max_bad_fraction,
        "order": args.order,
        "order_seed": args.order_seed,
    }


def _float_list(text: str) -> list[float]:
    """A comma list of floats (their count and range are checked against the keypoints)."""
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _run_convert_coco(args: argparse.Namespace) -> int:
    manifest = convert_coco(
        args.images, args.annotations, args.out, tasks=args.tasks, keypoint_sigmas=args.keypoint_sigmas,
        **_shard_options(args),
    )
    return _report(manifest.num_samples, args.out)


def _run_convert_semantic(args: argparse.Namespace) -> int:
    try:
        classes = json.loads(args.classes.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{args.classes}: not valid JSON ({e})") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{args.classes}: expected a JSON list of class names")
    manifest = convert_semantic(args.images, args.masks, args.out, classes=classes, **_shard_options(args))
    return _report(manifest.num_samples, args.out)


def _run_convert_image_folder(args: argparse.Namespace) -> int:
    manifest = convert_image_folder(args.root, args.out, labels=args.labels, **_shard_options(args))
    return _report(manifest.num_samples, args.out)


def _run_convert_yolo(args: argparse.Namespace) -> int:
    from data_pipelines.conversion.yolo import convert_yolo

    manifest = convert_yolo(
        args.data, args.out, split=args.split, tasks=args.tasks, root=args.root, keypoint_sigmas=args.keypoint_sigmas,
        **_shard_options(args),
    )
    return _report(manifest.num_samples, args.out)


def _report(num_samples: int, out: Path) -> int:
    print(f"{num_samples} samples -> {out / MANIFEST_NAME}")
    skipped = out / SKIPPED_NAME
    if skipped.is_file():
        records = json.loads(skipped.read_text())["skipped"]
        print(f"{len(records)} bad record(s) skipped, listed with their problems in {skipped}")
    return 0
