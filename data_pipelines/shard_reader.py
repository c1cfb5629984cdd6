"""Sequential reading of sample ranges of tar shards, with every unreadable sample
reported in its place.

Shards are opened with webdataset (``wds.tarfile_samples``), so a URL may be a local
path, ``pipe:<command>`` (e.g. ``pipe:aws s3 cp s3://bucket/shard.tar -``) or anything
else ``webdataset.gopen`` opens. Samples are addressed by their index inside the tar;
the manifest's count says how many there must be.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import webdataset as wds

from data_pipelines.epoch_plan import ShardSpan


@dataclass(frozen=True)
class ReadFailure:
    """A sample that could not be read; stands in its place in the stream."""

    url: str
    index: int  # index of the sample inside the tar
    problem: str

    def __str__(self) -> str:
        return f"{self.url}: sample #{self.index}: {self.problem}"


class ManifestMismatch(ValueError):
    """A shard holds more samples than its manifest says: positions no longer identify
    samples, so exactly-once cannot hold. Raised whatever the bad-sample policy."""


def read_spans(urls: tuple[str, ...], spans: list[ShardSpan], *, sizes: tuple[int, ...]) -> Iterator[dict | ReadFailure]:
    """One item per position of ``spans``, in order: the raw webdataset sample (members
    by extension, ``__key__``, ``__url__``) or a :class:`ReadFailure`."""
    for span in spans:
        yield from _read_span(urls[span.shard], span, expected=sizes[span.shard])


def _read_span(url: str, span: ShardSpan, *, expected: int) -> Iterator[dict | ReadFailure]:
    index = 0
    try:
        for raw in wds.tarfile_samples([{"url": url}]):
            if index >= span.stop:  # only reached when the span runs to the shard's end
                raise ManifestMismatch(
                    f"{url}: holds more than the {expected} samples its manifest lists; "
                    f"the manifest is stale (convert the source again)"
                )
            if index >= span.start:
                yield raw
            index += 1
            if index == span.stop < expected:
                return  # the rest of the shard belongs to another slot: not read
    except ManifestMismatch:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error (tarfile, I/O, pipe) marks the rest bad
        problem = f"shard unreadable from here on ({type(e).__name__}: {e})"
    else:
        problem = f"shard ends after {index} samples; its manifest lists {expected} (truncated?)"
    for missing in range(max(index, span.start), span.stop):
        yield ReadFailure(url, missing, problem)
