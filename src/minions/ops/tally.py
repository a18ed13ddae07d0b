"""Hot-path counts for Minions' Prometheus series, handed to prometheus-client in batches.

Design note. prometheus-client takes a lock and runs a few Python calls on every ``inc()`` and
walks the buckets on every ``observe()``: one to two microseconds each, several times per
workflow and on every worker call. So the hot paths count in plain Python numbers instead: a
:class:`CounterTally` or :class:`HistogramTally` in front of each bound prometheus-client
child, and :func:`flush` adds to the child what accumulated since the last flush. Gru flushes
on a timer, and the registry flushes before every collection
(``minions.ops.metrics.BEFORE_COLLECT``), so a scrape, ``get_sample_value`` and the backend
snapshots always see every count: names, types, labels, buckets and values are
prometheus-client's, only the moment of the addition moves.

Threads. A tally is written only from the event loop (workflows, pipelines, resource calls and
worker-pool calls run there) and only ever grows; a flush may run on the loop (the timer) or on
the scrape's thread, so it never resets a tally: it remembers what it already handed over,
under one lock.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Histogram

from minions.ops import metrics as declared


class CounterTally:
    """A counter child's front: ``inc()`` is one addition."""

    __slots__ = ("_child", "_flushed", "total")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._flushed: float = 0
        self.total: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # refused here, as prometheus-client does, not later in a scrape
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.total += amount

    def _flush(self) -> None:
        total = self.total
        if total != self._flushed:
            self._child.inc(total - self._flushed)
            self._flushed = total


class HistogramTally:
    """A histogram child's front: ``observe()`` is a bisect and two additions. Its buckets are
    the child's own, so a value lands where prometheus-client would put it (``v <= bound``)."""

    __slots__ = ("_bounds", "_child", "_flushed", "_flushed_sum", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds = tuple(child._upper_bounds)  # ends with +Inf: every value has a bucket
        self.counts = [0] * len(self._bounds)
        self.sum = 0.0
        self._flushed = [0] * len(self._bounds)
        self._flushed_sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount

    def _flush(self) -> None:
        counts, flushed = self.counts, self._flushed
        if counts == flushed:
            return
        total = self.sum  # read before the buckets: a racing observe shows in the next flush
        for i, handed in enumerate(flushed):
            now = counts[i]
            if now != handed:
                self._child._buckets[i].inc(now - handed)
                flushed[i] = now
        self._child._sum.inc(total - self._flushed_sum)
        self._flushed_sum = total


Tally = CounterTally | HistogramTally

_lock = threading.Lock()
_tallies: dict[Any, Tally] = {}  # by child object (identity); the tally keeps it alive


def front(child: Any) -> Tally | None:
    """The tally in front of a prometheus-client counter or histogram child (one per child,
    however often it is asked for); ``None`` for anything else, which the caller then uses
    directly. A histogram whose internals are not the ones this module knows is not batched."""
    tally = _tallies.get(child)
    if tally is not None:
        return tally
    if isinstance(child, Counter):
        tally = CounterTally(child)
    elif isinstance(child, Histogram) and _has_buckets(child):
        tally = HistogramTally(child)
    else:
        return None
    with _lock:
        return _tallies.setdefault(child, tally)


def flush() -> None:
    """Hand every pending count to prometheus-client; from any thread."""
    with _lock:
        for tally in _tallies.values():
            tally._flush()


def _has_buckets(child: Any) -> bool:
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    return (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets) > 0
        and bounds[-1] == float("inf")
        and hasattr(getattr(child, "_sum", None), "inc")
    )


declared.BEFORE_COLLECT.append(flush)
