"""A manifest ships with downloaded data: it is untrusted and may not run commands or name
files outside its own directory."""
from __future__ import annotations

import json
import os

import pytest

from data_pipelines.manifest import load_manifest
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source


@pytest.fixture
def source(tmp_path):
    samples = [boxed_sample(f"s{i}", height=32, width=32, seed=i, category_id=1) for i in range(4)]
    write_source(tmp_path / "src", samples, name="src", tasks=["detection"], shard_size=2,
                 categories=[{"id": 1, "name": "thing"}])
    return tmp_path / "src"


def _set_shard_path(source, path: str) -> None:
    manifest_path = source / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["shards"][0]["path"] = path
    manifest_path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "path, problem",
    [
        ("pipe:touch {marker}; cat src-000000.tar", "URL or command"),
        ("file:///etc/passwd", "URL or command"),
        ("s3://bucket/shard.tar", "URL or command"),
        ("/etc/passwd", "absolute"),
        ("../elsewhere/src-000000.tar", "leaves the manifest's directory"),
        ("sub/../../src-000000.tar", "leaves the manifest's directory"),
    ],
)
def test_a_manifest_cannot_name_commands_urls_or_files_outside_its_directory(source, tmp_path, path, problem):
    marker = tmp_path / "pwned"
    _set_shard_path(source, path.format(marker=marker))
    with pytest.raises(ValueError, match=rf"manifest\.json: shards\[0\]\.path .*{problem}"):
        load_manifest(source)
    assert not marker.exists()


def test_a_symlinked_shard_leading_out_of_the_source_is_refused(source, tmp_path):
    outside = tmp_path / "secret.tar"
    outside.write_bytes(b"x")
    os.symlink(outside, source / "link.tar")
    _set_shard_path(source, "link.tar")
    with pytest.raises(ValueError, match=r"shards\[0\]\.path 'link\.tar' is a symlink that leads out"):
        load_manifest(source)


def test_plain_relative_shard_paths_and_subfolders_load(source):
    (source / "sub").mkdir()
    os.replace(source / "src-000000.tar", source / "sub" / "src-000000.tar")
    _set_shard_path(source, "sub/src-000000.tar")
    manifest = load_manifest(source)
    assert manifest.shard_urls()[0] == os.path.join(str(source), "sub/src-000000.tar")


def _set_annotation_file(source, path: str) -> None:
    manifest_path = source / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["annotation_file"] = path
    manifest_path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "path, problem",
    [
        # What older converters wrote: the original json's absolute path.
        ("/data/coco/annotations/person_keypoints_val2017.json",
         r"is absolute; this source was converted by an older polytask .* re-run `polytask data convert coco`"),
        ("../raw/annotations.json", "leaves the manifest's directory; a manifest may only name a ground-truth file"),
        ("sub/../../annotations.json", "leaves the manifest's directory"),
        ("pipe:cat /etc/passwd", "is a URL or command"),
        ("", "is not a non-empty string"),
    ],
)
def test_a_manifest_ground_truth_must_lie_inside_its_directory(source, path, problem):
    _set_annotation_file(source, path)
    with pytest.raises(ValueError, match=rf"manifest\.json: annotation_file '.*' {problem}"):
        load_manifest(source)


def test_a_symlinked_ground_truth_leading_out_of_the_source_is_refused(source, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    os.symlink(outside, source / "annotations.json")
    _set_annotation_file(source, "annotations.json")
    with pytest.raises(ValueError, match=r"annotation_file 'annotations\.json' is a symlink that leads out"):
        load_manifest(source)


def test_a_relative_ground_truth_resolves_against_the_manifest_directory(source, tmp_path):
    (source / "gt").mkdir()
    (source / "gt" / "annotations.json").write_text("{}")
    _set_annotation_file(source, "gt/annotations.json")
    moved = tmp_path / "moved"
    os.replace(source, moved)
    assert load_manifest(moved).annotation_path() == os.path.join(str(moved), "gt/annotations.json")
