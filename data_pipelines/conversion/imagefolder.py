"""ImageFolder (``root/<class_name>/<image>``) -> shards for image classification; or images
with several named labels each from a CSV (``labels=``: weather, time of day, ...)."""
from __future__ import annotations

import csv
from pathlib import Path

from data_pipelines.bad_data import BadRecords
from data_pipelines.conversion.images import IMAGE_SUFFIXES, image_files, inspect_image, require_dir
from data_pipelines.conversion.shard_writer import (
    DEFAULT_BAD_SAMPLE_POLICY,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_ORDER,
    DEFAULT_ORDER_SEED,
    DEFAULT_SHARD_MAX_BYTES,
    DEFAULT_SHARD_MAX_SAMPLES,
    DEFAULT_WORKERS,
    Sample,
    caught,
    json_bytes,
    parallel_map,
    sample_key,
    write_source,
)
from data_pipelines.manifest import Manifest
from data_pipelines.schema import TASK_TYPES


def convert_image_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    labels: str | Path | None = None,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
) -> Manifest:
    """Convert an ImageFolder source, ``root/<class_name>/<image>``.

    Class names are the sorted sub-directory names (empty ones included, so every split of
    a dataset gets the same list); ``class_id`` in ``<key>.json`` indexes them. Files that
    are not .jpg/.jpeg/.png are ignored, as torchvision's ImageFolder ignores them.

    With ``labels``, a CSV whose header is ``file,<field>,<field>...``: one row per image
    (``file`` relative to ``root``), a class name per field, an empty cell where the image
    is not labelled for that field (no loss there). Each field becomes an image label of
    the source (``Manifest.image_labels``, its classes sorted), trained as a classification
    task of its own; the sub-directories then mean nothing.

    Args:
        root: the directory holding one sub-directory per class (or the images ``labels`` names).
        labels: the CSV of named labels, see above.
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction, order, order_seed: as in :func:`convert_coco`.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    root = Path(root)
    require_dir(root)
    if labels is not None:
        image_labels, files = _csv_labels(root, Path(labels))
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{root}: no class sub-directories")
        files = [(path, class_id) for class_id, c in enumerate(classes) for path in image_files(root / c)]
        if not files:
            raise ValueError(f"{root}: no .jpg/.jpeg/.png images in its class sub-directories")

    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(root))
    paths = [path for path, _ in files]
    infos = parallel_map(caught(inspect_image), paths, workers=workers, desc=f"{name}: check images")
    good = bad.keep_good(files, infos, record=lambda file: str(file[0]))
    bad.check(len(files))
    samples = []
    # The index (the json's image id) counts kept images: ids stay 0..n-1.
    for index, ((path, label), (ext, width, height)) in enumerate(good):
        file_name = path.relative_to(root).as_posix()
        payload = {
            "image": {"id": index, "file_name": file_name, "width": width, "height": height},
            "annotations": [],
            **({"image_labels": label} if labels is not None else {"class_id": label}),
        }
        samples.append(Sample(sample_key(file_name), {ext: path, "json": json_bytes(payload)}))

    manifest = (Manifest(name=name, tasks=["classification"], shards=[], image_labels=image_labels)
                if labels is not None else Manifest(name=name, tasks=["classification"], shards=[], classes=classes))
    return write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(root),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        order=order,
        order_seed=order_seed,
        skipped=bad.summary(len(files)) if bad.problems else None,
    )


def _csv_labels(root: Path, path: Path) -> tuple[dict[str, list[str]], list[tuple[Path, dict[str, int | None]]]]:
    """The CSV's fields with their sorted classes, and per row its image and class index per
    field (None: an empty cell, not labelled); every problem names the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "file" or len(rows[0]) < 2:
        raise ValueError(f"{path}:1: the header must be file,<label>,<label>... (got {rows[0] if rows else []})")
    fields = [h.strip() for h in rows[0][1:]]
    for field in fields:
        if not field or "/" in field or field in TASK_TYPES or fields.count(field) > 1:
            raise ValueError(f"{path}:1: label name {field!r} must be unique, non-empty, without '/' and not a task "
                             f"type {list(TASK_TYPES)}")
    parsed, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(rows[0]):
            raise ValueError(f"{path}:{line}: {len(row)} values for the header's {len(rows[0])} columns")
        file = root / row[0]
        if not file.resolve().is_relative_to(root.resolve()) or not file.is_file():
            raise ValueError(f"{path}:{line}: image {row[0]!r} is not a file inside {root}")
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}:{line}: {row[0]!r} is not a .jpg/.jpeg/.png image")
        if row[0] in seen:
            raise ValueError(f"{path}:{line}: image {row[0]!r} is listed twice")
        seen.add(row[0])
        parsed.append((file, {f: v.strip() or None for f, v in zip(fields, row[1:])}))
    if not parsed:
        raise ValueError(f"{path}: no images listed")
    classes = {f: sorted({values[f] for _, values in parsed if values[f] is not None}) for f in fields}
    empty = [f for f, names in classes.items() if not names]
    if empty:
        raise ValueError(f"{path}: label(s) {empty} have no value on any line")
    return classes, [(file, {f: None if v is None else classes[f].index(v) for f, v in values.items()})
                     for file, values in parsed]
