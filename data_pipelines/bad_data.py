"""The bad-data policy, shared by the training stream and the converters.

``raise`` stops at the first bad sample with an error naming it; ``skip`` drops it,
counts it and logs it, and fails only once more than ``max_bad_fraction`` of what was
read is bad (a source that is mostly broken is a bug to fix, not noise to train on).
In training the fraction is judged per source over all ranks and data-loader workers,
against at least ``min_samples`` samples read (see :func:`check_bad_fraction`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES: tuple[str, ...] = ("raise", "skip")


class BadSampleError(ValueError):
    """A bad sample under policy ``raise``; the message names shard, key and problem."""


class TooManyBadSamples(RuntimeError):
    """More of a source is bad than ``max_bad_fraction`` allows."""


def check_policy(policy: str, max_bad_fraction: float, *, where: str) -> None:
    """ValueError naming ``where.bad_sample_policy`` / ``where.max_bad_fraction`` if invalid."""
    if policy not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"{where}.bad_sample_policy must be one of {list(BAD_SAMPLE_POLICIES)}, got {policy!r}")
    if not 0.0 <= max_bad_fraction < 1.0:
        # Below 1, so that a source with nothing but bad samples fails instead of spinning
        # (loader) or producing an empty source (converters).
        raise ValueError(f"{where}.max_bad_fraction must be in [0, 1), got {max_bad_fraction}")


def too_many_bad(bad: int, total: int, max_bad_fraction: float) -> bool:
    """Whether ``bad`` of ``total`` is more than the policy allows."""
    return bad > max_bad_fraction * total


def check_bad_fraction(
    source: str, *, bad: int, read: int, max_bad_fraction: float, min_samples: int, where: str
) -> None:
    """Raise :class:`TooManyBadSamples` if more than ``max_bad_fraction`` of the samples of
    ``source`` read (``where``: by whom) are bad, judged against at least ``min_samples``
    samples: one bad sample among the first few read is not a high rate."""
    if too_many_bad(bad, max(read, min_samples), max_bad_fraction):
        raise TooManyBadSamples(
            f"source {source!r}: {bad} of {read} samples read {where} were bad, more than "
            f"data.max_bad_fraction={max_bad_fraction} (judged against at least "
            f"data.bad_fraction_min_samples={min_samples} samples; each rank's warnings name its bad samples)"
        )


class BadRecords:
    """The problems a converter finds in its input, under a policy.

    ``raise``: :meth:`report` raises the problem as it is found. ``skip``: it logs it and
    files it under its *record* (one shard sample, e.g. an image with its annotations, or
    an annotation that names no image), which the converter then leaves out;
    :meth:`check` fails once more than ``max_bad_fraction`` of all records are bad.
    """

    def __init__(self, policy: str, max_bad_fraction: float, *, where: str) -> None:
        check_policy(policy, max_bad_fraction, where="convert")
        self.policy = policy
        self.max_bad_fraction = max_bad_fraction
        self.where = where
        self.problems: dict[str, list[str]] = {}  # record -> its problems, in the order found

    def report(self, record: str, error: Exception) -> None:
        if self.policy == "raise":
            raise error
        log.warning("%s: skipped %s: %s", self.where, record, error)
        self.problems.setdefault(record, []).append(str(error))

    def keep_good(self, items: list, results: list, *, record: Callable[[Any], str]) -> list[tuple[Any, Any]]:
        """``(item, result)`` for the items whose check returned a result; an exception
        returned instead (see the converters' ``_caught``) is reported under ``record(item)``."""
        good = []
        for item, result in zip(items, results):
            if isinstance(result, Exception):
                self.report(record(item), result)
            else:
                good.append((item, result))
        return good

    def __contains__(self, record: str) -> bool:
        return record in self.problems

    def check(self, records: int) -> None:
        """Raise :class:`TooManyBadSamples` if too many of ``records`` are bad."""
        if too_many_bad(len(self.problems), records, self.max_bad_fraction):
            first = next(iter(self.problems.values()))[0]
            raise TooManyBadSamples(
                f"{self.where}: {len(self.problems)} of {records} records are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction} (first: {first}); nothing was written"
            )

    def summary(self, records: int) -> dict:
        """What was left out and why, as plain data (the converters' ``skipped.json``)."""
        return {
            "policy": self.policy,
            "max_bad_fraction": self.max_bad_fraction,
            "records": records,
            "skipped": [{"record": r, "problems": p} for r, p in self.problems.items()],
        }
