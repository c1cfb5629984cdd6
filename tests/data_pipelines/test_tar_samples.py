"""Reading one shard: the same samples as webdataset on an intact tar; on a cut one, every
sample complete before the cut, and one failure that says where."""
import tarfile

import pytest
import webdataset as wds

from data_pipelines.streaming.epoch_plan import ShardSpan
from data_pipelines.streaming.shard_reader import ReadFailure, read_spans
from data_pipelines.streaming.tar_samples import ShardReadError, TarSamples
from tests.data_pipelines.shard_fixtures import boxed_sample, write_source

N = 4


@pytest.fixture
def shard(tmp_path):
    samples = [boxed_sample(f"k{i}", height=16, width=16, seed=i, category_id=1) for i in range(N)]
    write_source(tmp_path, samples, name="src", tasks=["detection"], shard_size=N)
    path = tmp_path / "src-000000.tar"
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    return path, members


def _cut(path, at: int):
    path.write_bytes(path.read_bytes()[:at])


def _read(url: str) -> tuple[list[dict], ShardReadError | None]:
    return _read_all(TarSamples(url))


def _read_all(archive: TarSamples) -> tuple[list[dict], ShardReadError | None]:
    out = []
    try:
        for raw in archive:
            out.append(raw)
    except ShardReadError as e:
        return out, e
    return out, None


def test_intact_shard_reads_as_webdataset_reads_it(shard):
    path, _ = shard
    ours, error = _read(str(path))
    assert error is None
    assert ours == list(wds.tarfile_samples([{"url": str(path)}]))
    assert _read(f"pipe:cat {path}")[0] == [raw | {"__url__": f"pipe:cat {path}"} for raw in ours]


def test_cut_inside_member_data_names_the_member_and_keeps_the_samples_before(shard):
    path, members = shard
    jpg = members["k2.jpg"]
    _cut(path, jpg.offset_data + 100)
    samples, error = _read(str(path))
    assert [s["__key__"] for s in samples] == ["k0", "k1"]  # k1 is complete: delivered
    assert error is not None and error.member == "k2.jpg" and error.offset == jpg.offset
    assert f"member 'k2.jpg' (header at byte {jpg.offset}) is cut short" in str(error)


@pytest.mark.parametrize("into", [100, 600])
def test_cut_inside_a_header_names_the_offset(shard, into):
    path, members = shard
    header = members["k2.jpg"].offset
    assert members["k2.jpg"].offset_data - header > 600  # a PAX record precedes the member's own header
    _cut(path, header + into)
    archive = TarSamples(str(path))
    samples, error = _read_all(archive)
    # The header cut short could have been k1's next member: k1 is handed out as read, for
    # the decoder to check; here it is complete.
    assert [s["__key__"] for s in samples] == ["k0", "k1"] and set(samples[1]) >= {"jpg", "json"}
    if into < 512:
        # A cut inside a 512-byte header block is, to tarfile, the end of the archive.
        assert error is None and archive.end == header
    else:
        assert error is not None and error.member is None and error.offset == header
        assert f"member header at byte {header} is cut short" in str(error)


@pytest.mark.parametrize("where", ["data", "boundary"])
def test_shard_reader_reports_the_lost_samples_once_with_the_cut(shard, where):
    path, members = shard
    # Inside k2's data, or exactly between k1 and k2 (tarfile then sees a clean end).
    at = members["k2.jpg"].offset_data + 100 if where == "data" else members["k2.jpg"].offset
    _cut(path, at)
    items = list(read_spans((str(path),), [ShardSpan(0, 1, N)], sizes=(N,)))
    assert [i["__key__"] for i in items[:1]] == ["k1"]
    failures = items[1:]
    assert [f.index for f in failures] == [2, 3] and all(isinstance(f, ReadFailure) for f in failures)
    assert len({f.problem for f in failures}) == 1 and all(f.lost == (2, 4) for f in failures)
    ends = f"shard ends at byte {at} after 2 samples; its manifest lists 4"
    expected = "member 'k2.jpg'" if where == "data" else ends
    assert expected in failures[0].problem
    assert failures[0].summary().startswith(f"{path}: 2 samples (#2-#3) lost: ")


def test_a_file_that_is_not_a_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"not a tar at all" * 100)
    samples, error = _read(str(path))
    assert samples == [] and error is not None and "cannot be opened as a tar" in str(error)
