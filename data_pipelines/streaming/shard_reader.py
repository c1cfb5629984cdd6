"""Sequential reading of sample ranges of tar shards, with every unreadable sample
reported in its place.

Shards are opened with webdataset's ``gopen`` (see ``tar_samples``), so a URL may be a
local path, ``pipe:<command>`` (e.g. ``pipe:aws s3 cp s3://bucket/shard.tar -``) or
anything else ``webdataset.gopen`` opens. Samples are addressed by their index inside
the tar; the manifest's count says how many there must be.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from data_pipelines.streaming.epoch_plan import ShardSpan
from data_pipelines.streaming.tar_samples import ShardReadError, TarSamples


@dataclass(frozen=True)
class ReadFailure:
    """A sample that could not be read; stands in its place in the stream. All samples
    lost to one failure share ``problem`` and ``lost``, so it can be reported once."""

    url: str
    index: int  # index of the sample inside the tar
    problem: str
    lost: tuple[int, int]  # [first, stop): the indices of the span lost with it

    def __str__(self) -> str:
        return f"{self.url}: sample #{self.index}: {self.problem}; {self._range()} lost"

    def summary(self) -> str:
        """The failure once, for all the samples it lost."""
        return f"{self.url}: {self._range()} lost: {self.problem}"

    def _range(self) -> str:
        first, stop = self.lost
        return f"sample #{first}" if stop - first == 1 else f"{stop - first} samples (#{first}-#{stop - 1})"


class ManifestMismatch(ValueError):
    """A shard holds more samples than its manifest says: positions no longer identify
    samples, so exactly-once cannot hold. Raised whatever the bad-sample policy."""


def read_spans(urls: tuple[str, ...], spans: list[ShardSpan], *, sizes: tuple[int, ...]) -> Iterator[dict | ReadFailure]:
    """One item per position of ``spans``, in order: the raw webdataset sample (members
    by extension, ``__key__``, ``__url__``) or a :class:`ReadFailure`."""
    for span in spans:
        yield from _read_span(urls[span.shard], span, expected=sizes[span.shard])


def _read_span(url: str, span: ShardSpan, *, expected: int) -> Iterator[dict | ReadFailure]:
    index = span.start
    samples = TarSamples(url, start=span.start)  # the samples before the span are skipped unread
    try:
        for raw in samples:
            if index >= span.stop:  # only reached when the span runs to the shard's end
                raise ManifestMismatch(
                    f"{url}: holds more than the {expected} samples its manifest lists; "
                    f"the manifest is stale (convert the source again)"
                )
            yield raw
            index += 1
            if index == span.stop < expected:
                return  # the rest of the shard belongs to another slot: not read
    except ShardReadError as e:  # names the byte offset and member
        problem = f"shard truncated or corrupt after {index} samples: {e}"
    except ManifestMismatch:
        raise
    except Exception as e:  # noqa: BLE001 - any other reader error marks the rest lost
        problem = f"shard unreadable after {index} samples ({type(e).__name__}: {e})"
    else:
        problem = (
            f"shard ends at byte {samples.end} after {index} samples; its manifest lists {expected} (truncated?)"
        )
    lost = (max(index, span.start), span.stop)
    for missing in range(*lost):
        yield ReadFailure(url, missing, problem, lost)
