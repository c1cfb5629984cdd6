"""A rank's endless stream of training batches, mixed from several sources.

Each rank has ``readers_per_rank`` readers; reader ``l`` builds the rank's batches
``l, l + R, l + 2R, ...`` and owns one :class:`SourceReader` per source (reader slot
``rank * R + l``, see ``epoch_plan``). Batch ``b``'s sources come from the
:class:`TaskSampler`, a pure function of ``b`` and the slot, which keeps every slot's
count of every source within one of the others (one global epoch per source).
Data-loader worker ``w`` of ``W`` builds batches ``w, w + W, ...`` (the order in which the loader collects them), which with
``W`` dividing ``R`` touches readers of its own only: the batch sequence is a function
of (seed, world_size, rank, R) and never of ``W``.

Bad data: a sample that cannot be read or decoded raises under policy ``raise``; under
``skip`` it is logged, counted per source, and replaced by the same reader's next
sample of that source, so batches stay full and positions stay exact. Whether too many
are bad is judged over all ranks by the trainer (``TrainLoader.check_bad_samples``),
from these counts; a reader raises itself only when it finds no good sample at all.
"""
from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.bad_data import (  # noqa: F401 - the policies and errors stay importable from here
    BAD_SAMPLE_POLICIES,
    BadSampleError,
    TooManyBadSamples,
    check_policy,
)
from data_pipelines.streaming.batch_transport import PackedBatch, pack
from data_pipelines.streaming.epoch_plan import SourcePlan
from data_pipelines.streaming.prepare import SamplePreparer
from data_pipelines.streaming.shard_reader import ReadFailure
from data_pipelines.streaming.source_reader import SourceReader
from data_pipelines.streaming.stream_state import (
    check_compatible,
    initial_state,
    next_batch,
    pack_segments,
    stream_layout,
    unpack_segments,
)
from data_pipelines.streaming.task_sampler import TaskSampler

log = logging.getLogger(__name__)

class MixedSourceStream(IterableDataset):
    """Yields batches forever, packed for the hand-over (``batch_transport``);
    ``state_dict``/``load_state_dict`` hold the position."""

    def __init__(
        self,
        plans: list[SourcePlan],
        *,
        prepare: SamplePreparer,
        sampler: TaskSampler,
        seed: int,
        world_size: int,
        rank: int,
        readers_per_rank: int,
        bad_sample_policy: str,
        max_bad_fraction: float,
        bad_fraction_min_samples: int,
    ) -> None:
        super().__init__()
        check_policy(bad_sample_policy, max_bad_fraction, where="data")
        self.plans = {p.name: p for p in plans}
        self.prepare = prepare
        self.sampler = sampler
        self.rank = rank
        self.readers_per_rank = readers_per_rank
        self.num_slots = world_size * readers_per_rank
        self.bad_sample_policy = bad_sample_policy
        self.max_bad_fraction = max_bad_fraction
        self.bad_fraction_min_samples = bad_fraction_min_samples
        self.layout = stream_layout(
            seed=seed, world_size=world_size, rank=rank, readers_per_rank=readers_per_rank, plans=plans
        )
        self._state = initial_state(self.layout)
        # Built from the state on first use, in whichever process reads.
        self._readers: dict[tuple[int, str], SourceReader] = {}
        # Read failures already logged: one truncated shard loses many samples, logged once.
        self._logged_failures: set[tuple[int, str, tuple[int, int]]] = set()
        # Bad samples read in a row per (reader, source), in this process only: a guard
        # against a reader that never finds a good sample (its batch would never come).
        self._bad_in_a_row: dict[tuple[int, str], int] = {}

    # --- position ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        check_compatible(state, self.layout)
        self._state = copy.deepcopy(state)
        self._readers = {}

    # --- batches ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if self.readers_per_rank % workers:
            raise ValueError(
                f"data.num_workers={workers} must divide data.readers_per_rank={self.readers_per_rank}: "
                f"each reader's batches must all go to one worker"
            )
        for batch in itertools.count(next_batch(self._state) + worker, workers):
            yield self._build(batch)

    def _build(self, batch: int) -> PackedBatch:
        reader = batch % self.readers_per_rank
        state = self._state["readers"][str(reader)]
        if state["next_batch"] != batch:  # a bug, not a data problem
            raise RuntimeError(f"reader {reader} is at batch {state['next_batch']}, asked for batch {batch}")
        sources = self.sampler.batch_sources(batch, slot=self.rank * self.readers_per_rank + reader)
        samples = [self._next_good_sample(reader, source) for source in sources]
        state["next_batch"] = batch + self.readers_per_rank
        return pack(samples)

    def _next_good_sample(self, reader: int, source: str) -> dict:
        counts = self._state["readers"][str(reader)]["sources"][source]
        stream = self._source_reader(reader, source, counts)
        while True:
            item = next(stream)
            counts["epoch"], counts["position"] = stream.epoch, stream.position
            counts["pending"] = pack_segments(stream.pending)
            if isinstance(item.payload, ReadFailure):
                problem = str(item.payload)
                # One failure (a truncated shard) loses a run of samples: each counts as
                # bad, the failure is logged once, with the run.
                failure = (item.epoch, item.payload.url, item.payload.lost)
                note = None if failure in self._logged_failures else f"unreadable samples: {item.payload.summary()}"
                self._logged_failures.add(failure)
            else:
                try:
                    sample = self.prepare(
                        item.payload, source=source, epoch=item.epoch, shard=item.shard, index=item.index
                    )
                except ValueError as e:  # decode_sample's message names shard, key and problem
                    problem = str(e)
                    note = f"bad sample: {problem}"
                else:
                    counts["samples"] += 1
                    self._bad_in_a_row.pop((reader, source), None)
                    return sample
            self._bad_sample(source, problem, counts, reader=reader, share_size=stream.share_size, note=note)

    def _bad_sample(
        self, source: str, problem: str, counts: dict, *, reader: int, share_size: int, note: str | None
    ) -> None:
        """Raise, or count the sample as bad and log ``note`` (when given) as skipped."""
        if self.bad_sample_policy == "raise":
            raise BadSampleError(
                f"source {source!r}: bad sample: {problem} (data.bad_sample_policy=skip drops and counts bad samples)"
            )
        counts["bad"] += 1
        if note is not None:
            log.warning("source %r: skipped %s", source, note)
        # The fraction is not judged here: one reader's share of a source may be a handful
        # of samples, where a single bad one is a high rate (the trainer judges the source).
        in_a_row = self._bad_in_a_row[(reader, source)] = self._bad_in_a_row.get((reader, source), 0) + 1
        if in_a_row >= max(share_size, self.bad_fraction_min_samples):
            raise TooManyBadSamples(
                f"source {source!r}: reader {reader} of rank {self.rank} read {in_a_row} samples in a row and every one "
                f"was bad (last: {problem})"
            )

    def _source_reader(self, reader: int, source: str, counts: dict) -> SourceReader:
        key = (reader, source)
        if key not in self._readers:
            self._readers[key] = SourceReader(
                self.plans[source],
                slot=self.rank * self.readers_per_rank + reader,
                num_slots=self.num_slots,
                epoch=counts["epoch"],
                position=counts["position"],
                pending=unpack_segments(counts["pending"]),
            )
        return self._readers[key]
