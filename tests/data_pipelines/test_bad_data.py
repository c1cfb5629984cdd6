"""Each kind of bad data, under both policies: ``raise`` names shard, key and problem;
``skip`` drops the sample, counts and logs it, and nothing else is lost; too many bad
samples of a source (judged over all ranks, see test_bad_data_distributed.py) stop the run."""
import itertools
import json
import logging
import math
import re
import tarfile

import pytest
import torch

from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.shard_reader import ManifestMismatch
from data_pipelines.streaming.stream import BadSampleError, TooManyBadSamples
from data_pipelines.streaming.config import TransformConfig
from tests.data_pipelines.shard_fixtures import (
    KEYPOINT_SCHEMA,
    boxed_sample,
    jpeg_bytes,
    png_bytes,
    write_source,
)

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
    # Mistyped annotation fields: a bad sample naming the annotation, not a TypeError.
    "one_point_polygon": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(segmentation=[[1, 1]])),
                          "annotation 0: segmentation polygon 0 has 2 values"),
    "two_point_polygon": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(segmentation=[[1, 1, 5, 5]])),
                          "annotation 0: segmentation polygon 0 has 4 values"),
    "null_keypoints": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(keypoints=None)),
                       r"annotation 0: keypoints are null, expected 3 x 3 numbers"),
    "list_category_id": (lambda raw: _with_meta(raw, lambda m: _ann(m).update(category_id=[1])),
                         r"annotation 0: category_id \[1\] is not an integer"),
    "null_annotations": (lambda raw: _with_meta(raw, lambda m: m.update(annotations=None)),
                         "'json' annotations is null, expected a list"),
}


def write_bad_source(root, case: str):
    samples = [boxed_sample(k, height=16, width=16, seed=i, category_id=1) for i, k in enumerate(KEYS)]
    if case != "truncated_tar":
        samples[BAD] = CASES[case][0](samples[BAD])
    write_source(root, samples, name="src", tasks=["detection", "instance_mask", "keypoints", "semantic"],
                 shard_size=SHARD, categories=CATEGORIES, keypoints=KEYPOINT_SCHEMA, semantic_classes=["bg", "thing"])
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
# A reader that starts inside the shard skips the samples before its start by their headers
# and meets the cut in the header of #3.
TRUNCATED = (rf"shard truncated or corrupt after (2 samples: member '{KEYS[2 * SHARD + 2]}\.jpg' \(header at byte \d+\)"
             rf"|3 samples: member header at byte \d+ is cut short)")
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
    with caplog.at_level(logging.WARNING, logger="data_pipelines.streaming.stream"):
        # One sample into the next epoch: every position of the first has been read.
        epoch0 = [b.keys[0] for b in itertools.islice(loader, good + 1)][:good]
    # Every good sample of the epoch exactly once; only the bad ones are missing.
    assert sorted(epoch0) == [f"src/{k}" for k in KEYS if k not in LOST[case]]
    # Every lost sample counts; a truncated shard, one failure, is logged once for all of them.
    # The sample into the next epoch can come after that epoch's own bad reads (each epoch has
    # its own shard order and stripes): the count is the first epoch's, or both epochs'.
    repeats = loader.data_metrics()["data/src/bad_samples"] / len(LOST[case])
    assert repeats in (1, 2)
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    if case != "truncated_tar":
        assert len(messages) == repeats * len(LOST[case])
    else:  # once per reader stripe that meets the cut: #2-#3 in one, or #2 and #3 apart
        assert 1 <= len(messages) <= repeats * len(LOST[case])
        named = " ".join(messages)
        assert "src-000002.tar: 2 samples (#2-#3) lost: " in named or ("#2" in named and "#3" in named), messages
    assert all(re.search(PROBLEM[case], m) for m in messages)


def test_one_bad_sample_in_a_small_share_does_not_stop_skip(tmp_path):
    # Defaults: max_bad_fraction 0.01. The reader's share is 12 samples, 1 of them bad: a
    # reader's 1/12 is no reason to stop; the source's fraction is judged against at least
    # data.bad_fraction_min_samples samples, over all ranks.
    loader = loader_for(write_bad_source(tmp_path, "corrupt_jpeg"), bad_sample_policy="skip")
    keys = [b.keys[0] for b in itertools.islice(loader, 3 * (N - 1))]  # three epochs
    assert len(keys) == 3 * (N - 1) and f"src/{KEYS[BAD]}" not in keys
    counts = loader.bad_sample_counts()
    assert counts.dtype == torch.float64 and counts.tolist() == [[3], [3 * N]]  # bad, read
    assert loader.check_bad_samples(counts) == {"src": 3}
    assert loader.data_metrics(bad_samples={"src": 7})["data/src/bad_samples"] == 7  # the all-rank count


@pytest.mark.parametrize("min_samples, bad, read, trips", [
    (1000, 100, 120, False),  # 100 of at least 1000: 10 %, not more
    (1000, 101, 120, True),  # a mostly broken source fails before min_samples are read
    (10, 1, 9, False),  # judged against 10
    (0, 1, 9, True),
    (10, 5, 50, False),
    (10, 6, 50, True),
])
def test_check_bad_samples_judges_the_source_against_min_samples(tmp_path, min_samples, bad, read, trips):
    loader = loader_for(write_bad_source(tmp_path, "corrupt_jpeg"), bad_sample_policy="skip", max_bad_fraction=0.1,
                        bad_fraction_min_samples=min_samples)
    summed = torch.tensor([[bad], [read]], dtype=torch.float64)
    if not trips:
        assert loader.check_bad_samples(summed) == {"src": bad}
        return
    with pytest.raises(TooManyBadSamples, match=(
            rf"source 'src': {bad} of {read} samples read by all 1 rank\(s\) were bad, more than "
            rf"data.max_bad_fraction=0.1 \(judged against at least data.bad_fraction_min_samples={min_samples}")):
        loader.check_bad_samples(summed)


def test_a_reader_finding_no_good_sample_stops_instead_of_spinning(tmp_path):
    samples = [boxed_sample(k, height=16, width=16, seed=i, category_id=1) for i, k in enumerate(KEYS)]
    samples = [raw | {"jpg": b"not a jpeg"} for raw in samples]
    write_source(tmp_path, samples, name="src", tasks=["detection"], shard_size=SHARD, categories=CATEGORIES)
    loader = loader_for(tmp_path, bad_sample_policy="skip", bad_fraction_min_samples=30)
    with pytest.raises(TooManyBadSamples, match=r"'src': reader 0 of rank 0 read 30 samples in a row and every "
                                                r"one was bad \(last: .*cannot decode 'jpg'"):
        next(iter(loader))


def test_bad_fraction_min_samples_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"DataConfig.bad_fraction_min_samples must be >= 0, got -1"):
        loader_for(tmp_path, bad_fraction_min_samples=-1)


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
