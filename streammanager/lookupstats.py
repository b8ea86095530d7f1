"""Lookup counts and timings, gathered in the worker and added to the Prometheus metrics in batches.

In multiprocess mode every prometheus-client update takes a lock, checks the process id (a system call)
and writes the value into a memory-mapped file. A lookup updated three values (its counter, its
histogram's sum and bucket): a fifth of a lookup's instructions (callgrind at 10 nodes: 29k of 145k;
batched, 122k in all).
Here a lookup appends its action, outcome and time to a queue (no lock: a deque's append and popleft
are atomic); :meth:`LookupStats.flush` counts them and adds them to the metrics, every second (the
placement's housekeeper), before this worker answers a scrape, and when it stops. A scrape may miss
another worker's latest second; a worker that is killed (SIGKILL: the kernel's OOM killer, gunicorn's
timeout) loses the lookups of its last second from the counts.
"""
from __future__ import annotations

import bisect
import logging
import threading
from collections import deque

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
        self._recorded: deque[tuple[str, str, float | None]] = deque()  # since the last flush

    def record(self, action: str, outcome: str, seconds: float | None = None) -> None:
        if self._batched:  # one append (atomic, no lock): the lookup's thread does nothing else here
            self._recorded.append((action, outcome, seconds))
            return
        # a prometheus-client without the parts flush() uses: update at once
        self._counter.labels(action, outcome).inc()
        if seconds is not None:
            self._histogram.labels(action).observe(seconds)

    def flush(self) -> None:
        """Add what was recorded since the last flush to the metrics."""
        recorded = self._recorded
        counts: dict[tuple[str, str], int] = {}
        timings: dict[str, list] = {}  # action -> [sum, count per bucket...]
        bounds = self._bounds
        with self._lock:  # one flush at a time; record() appends meanwhile, popleft takes each once
            while recorded:
                action, outcome, seconds = recorded.popleft()
                key = (action, outcome)
                counts[key] = counts.get(key, 0) + 1
                if seconds is not None:
                    timing = timings.get(action)
                    if timing is None:
                        timing = timings[action] = [0.0] + [0] * len(bounds)
                    timing[0] += seconds
                    timing[1 + bisect.bisect_left(bounds, seconds)] += 1
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
