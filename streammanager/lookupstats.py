"""Lookup counts and timings, gathered in the worker and added to the Prometheus metrics in batches.

In multiprocess mode every prometheus-client update takes a lock, checks the process id (a system call)
and writes the value into a memory-mapped file. A lookup updated three values (its counter, its
histogram's sum and bucket): a fifth of a lookup's instructions (callgrind at 10 nodes: 29k of 145k;
batched, 122k in all).
Here a lookup adds two integers and a float under one lock; :meth:`LookupStats.flush` adds what
gathered to the metrics, every second (the placement's housekeeper), before this worker answers a
scrape, and when it stops. The metrics stay exact; another worker's latest second may be missing from
one scrape.
"""
from __future__ import annotations

import bisect
import logging
import threading

from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)


class LookupStats:
    """Batches for ``counter`` (labels: action, outcome) and ``histogram`` (label: action, one of
    ``actions``)."""

    def __init__(self, counter: Counter, histogram: Histogram, actions: tuple[str, ...]):
        self._counter = counter
        self._histogram = histogram
        children = [histogram.labels(a) for a in actions]
        self._batched = all(_adds_in_batches(c) for c in children)
        # the histogram's upper bounds, +Inf last, as prometheus-client keeps them
        self._bounds = tuple(children[0]._upper_bounds) if self._batched else ()  # noqa: SLF001
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._timings: dict[str, list] = {}  # action -> [sum, count per bucket...]

    def record(self, action: str, outcome: str, seconds: float | None = None) -> None:
        if not self._batched:  # a prometheus-client without the parts flush() uses: update at once
            self._counter.labels(action, outcome).inc()
            if seconds is not None:
                self._histogram.labels(action).observe(seconds)
            return
        key = (action, outcome)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if seconds is not None:
                timing = self._timings.get(action)
                if timing is None:
                    timing = self._timings[action] = [0.0] + [0] * len(self._bounds)
                timing[0] += seconds
                timing[1 + bisect.bisect_left(self._bounds, seconds)] += 1

    def flush(self) -> None:
        """Add what gathered since the last flush to the metrics."""
        with self._lock:
            counts, self._counts = self._counts, {}
            timings, self._timings = self._timings, {}
        for (action, outcome), n in counts.items():
            self._counter.labels(action, outcome).inc(n)
        for action, timing in timings.items():
            child = self._histogram.labels(action)
            child._sum.inc(timing[0])  # noqa: SLF001 (see _adds_in_batches)
            for bucket, n in zip(child._buckets, timing[1:]):  # noqa: SLF001
                if n:
                    bucket.inc(n)


def _adds_in_batches(child) -> bool:
    """Whether this prometheus-client's histogram child keeps a ``_sum`` and one ``_buckets`` value per
    bound that take ``inc(n)``: there is no public way to add n observations at once. Checked, not
    assumed, so that an upgrade that changes them falls back to one update per lookup."""
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    ok = (callable(getattr(getattr(child, "_sum", None), "inc", None)) and buckets is not None
          and bounds is not None and len(buckets) == len(bounds)
          and all(callable(getattr(b, "inc", None)) for b in buckets))
    if not ok:
        log.warning("prometheus-client histograms cannot take batches here: one update per lookup")
    return ok
