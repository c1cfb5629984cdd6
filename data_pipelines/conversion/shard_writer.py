"""The one shard writer every converter ends with: put the samples in a seeded random order
(``order="shuffled"``, the default) or keep the input's (``"original"``), plan shards in
that order, write them in parallel (each under a temporary name, renamed when complete),
then ``manifest.json`` last, which records the order and its seed. Also the thread pool and
per-item error capture the converters share.

Why shuffle: inputs are often sorted (an ImageFolder class by class, COCO by image id,
which follows collection order); written in that order, a shard holds one class, and the
loader's sequential reads could only mix a few shards at a time.

Shard contents are a pure function of the input and the seed: samples go to shards in a
fixed order whatever the number of workers, and tar headers carry fixed times and owners.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from data_pipelines.manifest import MANIFEST_NAME, SAMPLE_ORDERS, Manifest, ShardInfo
from data_pipelines.streaming.seeding import permutation

DEFAULT_SHARD_MAX_SAMPLES = 1000
DEFAULT_SHARD_MAX_BYTES = 256 * 2**20
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
DEFAULT_BAD_SAMPLE_POLICY = "raise"
DEFAULT_ORDER = "shuffled"
DEFAULT_ORDER_SEED = 0
DEFAULT_MAX_BAD_FRACTION = 0.01  # as the training loader's data.max_bad_fraction
SKIPPED_NAME = "skipped.json"  # under policy skip: the records left out, and why

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Sample:
    """One shard sample: member extension -> file to copy verbatim, or bytes to write."""

    key: str
    members: dict[str, Path | bytes]

    def num_bytes(self) -> int:
        return sum(m.stat().st_size if isinstance(m, Path) else len(m) for m in self.members.values())


def sample_key(file_name: str) -> str:
    """Tar-safe key from a relative file name: webdataset splits a member name at its first
    dot after the last slash, so the key keeps only letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(file_name).with_suffix("")))


def json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def write_source(
    manifest: Manifest,
    samples: list[Sample],
    out_dir: Path,
    *,
    where: str,
    shard_max_samples: int,
    shard_max_bytes: int,
    workers: int,
    skipped: dict | None = None,
    copies: dict[str, Path] | None = None,
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
) -> Manifest:
    """Order the samples (``order``, ``order_seed``), plan shards, check the manifest, write
    shards, then save the manifest.

    ``where`` (the source's file or directory) prefixes error messages; ``skipped``
    (``BadRecords.summary``) is saved as ``skipped.json``, and each of ``copies`` (name in
    ``out_dir`` -> file) is copied there atomically, before the manifest.
    """
    keys: set[str] = set()
    for sample in samples:
        if sample.key in keys:
            raise ValueError(f"{where}: two images map to the same shard key {sample.key!r}; rename one")
        keys.add(sample.key)
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"{where}: order {order!r} is not one of {list(SAMPLE_ORDERS)}")
    if order == "shuffled":
        samples = [samples[i] for i in permutation(len(samples), seed=order_seed)]
    manifest.order, manifest.order_seed = order, order_seed if order == "shuffled" else None
    plan = _plan_shards(samples, max_samples=shard_max_samples, max_bytes=shard_max_bytes)
    shard_paths = [out_dir / f"{manifest.name}-{i:06d}.tar" for i in range(len(plan))]
    manifest.shards = [ShardInfo(path=p.name, num_samples=len(s)) for p, s in zip(shard_paths, plan)]
    manifest.validate(where)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop an older manifest first: while shards are rewritten the directory must read as
    # incomplete, not as the old source pointing at new shards.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / SKIPPED_NAME).unlink(missing_ok=True)  # an earlier run's, not this one's
    try:
        jobs = list(zip(shard_paths, plan))
        sizes = parallel_map(_write_shard, jobs, workers=workers, desc=f"{manifest.name}: write shards")
    except BaseException:
        # Without its manifest a half-written source is never read; remove it all the same,
        # so a failed run leaves no tar behind to be mistaken for output.
        for path in shard_paths:
            for leftover in (path, _temporary(path)):
                if leftover.is_file():
                    leftover.unlink()
        raise
    for info, size in zip(manifest.shards, sizes):
        info.num_bytes = size
    if skipped is not None:
        (out_dir / SKIPPED_NAME).write_text(json.dumps(skipped, indent=1) + "\n")
    for name, source in (copies or {}).items():
        tmp = _temporary(out_dir / name)
        shutil.copyfile(source, tmp)  # also right when source is out_dir / name itself
        os.replace(tmp, out_dir / name)
    manifest.save(out_dir)
    manifest.root = str(out_dir)
    return manifest


def _plan_shards(samples: list[Sample], *, max_samples: int, max_bytes: int) -> list[list[Sample]]:
    """Split samples, in order, into shards of at most ``max_samples`` samples and, unless a
    single sample is larger, ``max_bytes`` payload bytes."""
    shards: list[list[Sample]] = [[]]
    size = 0
    for sample in samples:
        sample_bytes = sample.num_bytes()
        if shards[-1] and (len(shards[-1]) >= max_samples or size + sample_bytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(sample)
        size += sample_bytes
    return shards


def _write_shard(job: tuple[Path, list[Sample]]) -> int:
    """Write one shard under a temporary name and rename it; returns its size in bytes."""
    import webdataset as wds  # here, not at the top: it imports torch, which `polytask data --help` must not wait for

    path, samples = job
    tmp = _temporary(path)
    with open(tmp, "wb") as stream:
        # Fixed mtime (and TarWriter's fixed owner names) make shards byte-reproducible;
        # PAX headers allow keys longer than USTAR's 100-character names.
        with wds.TarWriter(stream, encoder=False, mtime=0, format="PAX_FORMAT") as writer:
            for sample in samples:
                members = {ext: m.read_bytes() if isinstance(m, Path) else m for ext, m in sample.members.items()}
                writer.write({"__key__": sample.key, **members})
    os.replace(tmp, path)
    return path.stat().st_size


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def parallel_map(fn: Callable[[T], R], items: list[T], *, workers: int, desc: str) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, in order, with a progress bar.

    Threads suffice: decoding (PIL) and file I/O release the GIL. The first failing item
    (in input order) raises its own exception.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="it", leave=False))


def caught(fn: Callable[[T], R]) -> Callable[[T], R | FileNotFoundError | ValueError]:
    """``fn`` returning, instead of raising, the errors that name a bad input file, so
    the caller can apply the bad-sample policy to each item in input order."""

    def call(item: T) -> R | FileNotFoundError | ValueError:
        try:
            return fn(item)
        except (FileNotFoundError, ValueError) as e:
            return e

    return call
