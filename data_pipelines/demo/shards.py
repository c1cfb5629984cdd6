"""The demo's shards: what :func:`data_pipelines.demo.synthetic.generate_demo_data` wrote,
converted with the ordinary converters; and :func:`make_demo_shards`, the one call that
tests, benches and ``polytask data demo`` use to get them."""
from __future__ import annotations

import json
from pathlib import Path

from data_pipelines.conversion import convert_coco, convert_image_folder, convert_semantic
from data_pipelines.conversion.shard_writer import DEFAULT_WORKERS
from data_pipelines.demo.synthetic import DEMO_TASKS, generate_demo_data
from data_pipelines.manifest import Manifest

# Several shards per demo split, so data-loader workers and ranks have shards to split.
DEMO_SHARD_MAX_SAMPLES = 32


def convert_demo(
    raw: dict[str, dict[str, Path]], out_root: str | Path, *, workers: int = DEFAULT_WORKERS
) -> dict[str, dict[str, Manifest]]:
    """Convert what :func:`data_pipelines.demo.synthetic.generate_demo_data` wrote.

    Args:
        raw: its return value, ``{source: {split: split_dir}}``.
        out_root: each source/split goes to ``out_root/<split>/<source>/``.
        workers: threads per conversion.

    Returns:
        ``{split: {source: Manifest}}``; each manifest's ``root`` is its directory.
    """
    out_root = Path(out_root)
    manifests: dict[str, dict[str, Manifest]] = {}
    for source, splits in raw.items():
        for split, split_dir in splits.items():
            out_dir = out_root / split / source
            common = {"name": source, "shard_max_samples": DEMO_SHARD_MAX_SAMPLES, "workers": workers}
            if source in ("shapes_instances", "shapes_keypoints"):
                manifest = convert_coco(
                    split_dir / "images", split_dir / "annotations.json", out_dir, tasks=DEMO_TASKS[source], **common
                )
            elif source == "shapes_semantic":
                classes = json.loads((split_dir / "classes.json").read_text())
                manifest = convert_semantic(
                    split_dir / "images", split_dir / "masks", out_dir, classes=classes, **common
                )
            elif source == "shapes_classes":
                manifest = convert_image_folder(split_dir, out_dir, **common)
            else:
                raise ValueError(f"unknown demo source {source!r}; known: {list(DEMO_TASKS)}")
            manifests.setdefault(split, {})[source] = manifest
    return manifests


def make_demo_shards(root: str | Path, *, seed: int = 0, num_images: dict[str, int] | None = None,
                     workers: int = DEFAULT_WORKERS) -> Path:
    """Generate the demo data under ``root/raw`` and convert it to ``root/shards``; returns
    the shards' root, holding ``<split>/<source>/manifest.json``."""
    root = Path(root)
    kwargs = {} if num_images is None else {"num_images": num_images}
    convert_demo(generate_demo_data(root / "raw", seed=seed, **kwargs), root / "shards", workers=workers)
    return root / "shards"


def demo_source_paths(shards: str | Path, *, split: str = "train") -> list[str]:
    """The demo sources' directories, in ``configs/demo_cpu.yaml``'s order."""
    return [str(Path(shards) / split / source) for source in DEMO_TASKS]
