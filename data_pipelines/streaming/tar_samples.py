"""The samples of one tar shard, in order, as webdataset groups them (members sharing a
key, by extension, plus ``__key__`` and ``__url__``), with a read failure located.

Unlike ``webdataset.tarfile_samples``, a sample is handed out as soon as a member of
the next one starts, so a shard cut off inside sample ``i`` still delivers sample
``i - 1``; and a failure says where it happened (byte offset and member), so it can be
reported once instead of as a string of anonymous bad samples.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

import webdataset as wds

# webdataset's own splitting of member names, so keys and extensions match its readers.
_base_plus_ext = wds.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (e.g. __index__)


class ShardReadError(Exception):
    """A shard that cannot be read past ``offset`` (bytes; None: not opened at all);
    ``member`` is the member being read, if its header was."""

    def __init__(self, url: str, *, offset: int | None, member: str | None, cause: BaseException) -> None:
        if offset is None:
            where = "cannot be opened as a tar"
        elif member is None:
            where = f"member header at byte {offset} is cut short or corrupt"
        else:
            where = f"member {member!r} (header at byte {offset}) is cut short or corrupt"
        super().__init__(f"{where} ({type(cause).__name__}: {cause})")
        self.url = url
        self.offset = offset
        self.member = member


class TarSamples:
    """Iterator of the raw samples of the shard at ``url`` (a path, ``pipe:...`` or
    whatever ``webdataset.gopen`` opens); raises :class:`ShardReadError` where reading
    fails.

    The sample being assembled when a member *header* cannot be read is handed out as
    read so far (the decoder names any member it lacks); a failure inside a member's
    *data* loses that member's sample. ``end`` is the byte offset where the archive
    ended, once it has (tarfile takes a header cut short for the end of the archive).
    """

    def __init__(self, url: str, *, start: int = 0) -> None:
        self.url = url
        # Samples before ``start`` are not handed out; from a seekable file their data
        # is not even read (the headers are), so a reader can start inside a shard cheaply.
        self.start = start
        self.end: int | None = None
        self._samples = self._generate()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._samples)

    def _generate(self) -> Iterator[dict]:
        url = self.url
        try:
            stream = wds.gopen(url, "rb")  # closed when dropped, as webdataset leaves it
            # A local file is read in random-access mode: one read per member, where stream
            # mode copies its buffer in small pieces (a third of the reading time).
            seekable = getattr(stream, "seekable", lambda: False)()
            tar = tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")
        except Exception as e:  # noqa: BLE001 - missing, not a tar, failing pipe
            raise ShardReadError(url, offset=None, member=None, cause=e) from e
        current: dict | None = None
        skipping: str | None = None  # key of the sample being skipped
        skipped = 0
        while True:
            offset = tar.offset
            try:
                info = tar.next()
            except Exception as e:  # noqa: BLE001 - tarfile, I/O, pipe exit status
                if current is not None:
                    yield current
                raise ShardReadError(url, offset=offset, member=None, cause=e) from e
            if info is None:
                self.end = offset
                break
            tar.members = []  # stream mode keeps every header otherwise
            prefix, suffix = _base_plus_ext(info.name)
            if not info.isreg() or prefix is None or _META.match(info.name):
                continue
            if current is not None and prefix != current["__key__"]:
                yield current
                current = None
            # tarfile seeks over the data of a member that is never extracted.
            if prefix == skipping:
                continue  # another member of a skipped sample
            if skipped < self.start:
                skipping, skipped = prefix, skipped + 1
                continue
            try:
                data = tar.extractfile(info).read()
            except Exception as e:  # noqa: BLE001
                raise ShardReadError(url, offset=info.offset, member=info.name, cause=e) from e
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                raise ValueError(f"member {info.name!r}: duplicate file name in tar file")
            current[suffix] = data
        if current is not None:
            yield current
