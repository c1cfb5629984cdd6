"""Each kind of bad data, under both policies: ``raise`` names shard, key and problem;
``skip`` drops the sample, counts and logs it, and nothing else is lost."""
import itertools
import json
import logging
import math
import re
import tarfile

import pytest

from data_pipelines.loader import DataConfig, SourceConfig, build_train_loader
from data_pipelines.manifest import load_manifest
from data_pipelines.shard_reader import ManifestMismatch
from data_pipelines.stream import BadSampleError, TooManyBadSamples
from data_pipelines.transforms import TransformConfig
from tests.data_pipelines.shard_fixtures import boxed_sample, jpeg_bytes, png_bytes, write_source

N, SHARD = 12, 4
BAD = 5  # the bad sample: shard 1, index 1
KEYS = [f"k{i:03d}" for i in range(N)]
CATEGORIES = [{"id": 1, "name": "thing"}]


def _meta(raw: dict) -> dict:
    return json.loads(raw["json"])


def _with_meta(raw: dict, change) -> dict:
    meta = _meta(raw)
    change(meta)
    return raw | {"json": json.dumps(meta).encode()}


def _ann(meta: dict) -> dict:
    return meta["annotations"][0]


# case -> (make the bad sample from a good one, what the error says)
CASES = {
    "corrupt_jpeg": (lambda raw: raw | {"jpg": jpeg_bytes(16, 16)[:120]}, "cannot decode 'jpg'"),
    "missing_json": (lambda raw: {k: v for k, v in raw.items() if k != "json"}, "no 'json' member"),
    "json_missing_keys": (lambda raw: _with_meta(raw, lambda m: m.pop("annotations")),
                          r"missing key\(s\) \['annotations'\]"),
    "negative_box": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(bbox=[2, 2, -3, 4])), "negative size"),
    "nan_box": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(bbox=[math.nan, 2, 3, 4])), "non-finite"),
    "mask_wrong_size": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(
        segmentation={"size": [3, 3], "counts": [0, 9]})), r"RLE size \[3, 3\] != image size \[16, 16\]"),
    "semantic_wrong_size": (lambda raw: raw | {"seg.png": png_bytes(__import__("numpy").zeros((4, 4), "uint8"))},
                            r"'seg.png' has shape \(4, 4\)"),
}


def write_bad_source(root, case: str):
    samples = [boxed_sample(k, height=16, width=16, seed=i, category_id=1) for i, k in enumerate(KEYS)]
    if case != "truncated_tar":
        samples[BAD] = CASES[case][0](samples[BAD])
    write_source(root, samples, name="src", tasks=["detection", "instance_mask", "semantic"], shard_size=SHARD,
                 categories=CATEGORIES, semantic_classes=["bg", "thing"])
    if case == "truncated_tar":
        # Cut shard 2 inside the data of the first member of its sample #2: #2 and #3 are
        # lost; #0 and #1, complete before the cut, are read.
        path = root / "src-000002.tar"
        with tarfile.open(path) as tar:
            cut = next(m.offset_data for m in tar.getmembers() if m.name.startswith(KEYS[2 * SHARD + 2])) + 100
        path.write_bytes(path.read_bytes()[:cut])
    return root


def loader_for(root, **overrides):
    cfg = DataConfig(**({
        "sources": [SourceConfig(path=str(root))], "batch_size": 1, "num_workers": 0, "readers_per_rank": 1,
        "shuffle_buffer": 5, "seed": 0, "transforms": TransformConfig(image_size=16),
    } | overrides))
    return build_train_loader(cfg, rank=0, world_size=1)[0]


ALL_CASES = [*CASES, "truncated_tar"]
LOST = {case: [KEYS[BAD]] for case in CASES} | {"truncated_tar": KEYS[2 * SHARD + 2 : 3 * SHARD]}
# The truncation names where it happened: the member cut short and its offset.
TRUNCATED = rf"shard truncated or corrupt after 2 samples: member '{KEYS[2 * SHARD + 2]}\.jpg' \(header at byte \d+\)"
PROBLEM = {case: message for case, (_, message) in CASES.items()} | {"truncated_tar": TRUNCATED}


@pytest.mark.parametrize("case", ALL_CASES)
def test_raise_names_shard_key_and_problem(tmp_path, case):
    loader = loader_for(write_bad_source(tmp_path, case), bad_sample_policy="raise")
    # The sample's key, or for a lost tail of a truncated tar, its index in the shard.
    where = f"'{KEYS[BAD]}'" if case != "truncated_tar" else "sample #[23]"
    shard = "src-000001.tar" if case != "truncated_tar" else "src-000002.tar"
    with pytest.raises(BadSampleError, match=f"{shard}.*{where}.*{PROBLEM[case]}"):
        list(itertools.islice(loader, 2 * N))


@pytest.mark.parametrize("case", ALL_CASES)
def test_skip_drops_counts_and_logs_and_loses_nothing_else(tmp_path, case, caplog):
    loader = loader_for(write_bad_source(tmp_path, case), bad_sample_policy="skip", max_bad_fraction=0.25)
    good = N - len(LOST[case])
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        # One sample into the next epoch: every position of the first has been read.
        epoch0 = [b.keys[0] for b in itertools.islice(loader, good + 1)][:good]
    # Every good sample of the epoch exactly once; only the bad ones are missing.
    assert sorted(epoch0) == [f"src/{k}" for k in KEYS if k not in LOST[case]]
    # Every lost sample counts; a truncated shard, one failure, is logged once for all of them.
    assert loader.data_metrics()["data/src/bad_samples"] == len(LOST[case])
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == (len(LOST[case]) if case != "truncated_tar" else 1)
    assert all(re.search(PROBLEM[case], m) for m in messages)
    if case == "truncated_tar":
        assert "src-000002.tar: 2 samples (#2-#3) lost: " in messages[0]


def test_skip_fails_the_run_past_max_bad_fraction(tmp_path):
    loader = loader_for(write_bad_source(tmp_path, "corrupt_jpeg"), bad_sample_policy="skip", max_bad_fraction=0.05)
    with pytest.raises(TooManyBadSamples, match=r"'src': 1 of \d+ samples read by reader 0 of rank 0 were bad.*0.05"):
        list(itertools.islice(loader, N))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_stale_manifest_fails_under_either_policy(tmp_path, policy):
    samples = [boxed_sample(k, height=16, width=16, seed=i, category_id=1) for i, k in enumerate(KEYS)]
    root = tmp_path
    write_source(root, samples, name="src", tasks=["detection"], shard_size=SHARD, categories=CATEGORIES)
    manifest = load_manifest(root)
    manifest.shards[0].num_samples = SHARD - 1  # the tar holds one more
    manifest.save(root)
    with pytest.raises(ManifestMismatch, match="src-000000.tar: holds more than the 3 samples"):
        list(itertools.islice(loader_for(root, bad_sample_policy=policy, max_bad_fraction=0.5), 2 * N))
