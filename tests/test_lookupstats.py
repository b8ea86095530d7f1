"""Lookup metrics gathered in batches: exact once flushed, and one update at a time where batches cannot be added."""
from prometheus_client import CollectorRegistry, Counter, Histogram

import streammanager.lookupstats as lookupstats
from streammanager.lookupstats import LookupStats

BUCKETS = (0.0005, 0.001, 0.01, 0.5)


def metrics():
    registry = CollectorRegistry()
    counter = Counter("t_lookups_total", "lookups", ["action", "outcome"], registry=registry)
    histogram = Histogram("t_lookup_seconds", "time", ["action"], buckets=BUCKETS, registry=registry)
    return registry, counter, histogram


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def test_recorded_lookups_reach_the_metrics_at_the_flush_exactly():
    registry, counter, histogram = metrics()
    stats = LookupStats(counter, histogram, ("broadcast", "subscribe"))
    for seconds in (0.0003, 0.0004, 0.002, 0.2, 3.0):
        stats.record("subscribe", "ok", seconds)
    stats.record("subscribe", "not_found", 0.0001)
    stats.record("invalid", "bad_request")  # no timing
    assert value(registry, "t_lookups_total", action="subscribe", outcome="ok") == 0  # not yet
    stats.flush()
    assert value(registry, "t_lookups_total", action="subscribe", outcome="ok") == 5
    assert value(registry, "t_lookups_total", action="subscribe", outcome="not_found") == 1
    assert value(registry, "t_lookups_total", action="invalid", outcome="bad_request") == 1
    cumulative = {le: value(registry, "t_lookup_seconds_bucket", action="subscribe", le=le)
                  for le in ("0.0005", "0.001", "0.01", "0.5", "+Inf")}
    assert cumulative == {"0.0005": 3, "0.001": 3, "0.01": 4, "0.5": 5, "+Inf": 6}
    assert abs(value(registry, "t_lookup_seconds_sum", action="subscribe") - 3.2028) < 1e-9
    stats.flush()  # nothing gathered since: nothing added twice
    assert value(registry, "t_lookup_seconds_count", action="subscribe") == 6


def test_a_bound_itself_falls_in_its_own_bucket_as_prometheus_counts_it():
    registry, counter, histogram = metrics()
    stats = LookupStats(counter, histogram, ("subscribe",))
    stats.record("subscribe", "ok", 0.001)
    stats.flush()
    direct_registry, _, direct = metrics()
    direct.labels("subscribe").observe(0.001)
    for le in ("0.0005", "0.001", "+Inf"):
        assert value(registry, "t_lookup_seconds_bucket", action="subscribe", le=le) == \
            value(direct_registry, "t_lookup_seconds_bucket", action="subscribe", le=le)


def test_without_the_histogram_parts_a_flush_needs_each_lookup_is_counted_at_once(monkeypatch):
    monkeypatch.setattr(lookupstats, "_adds_in_batches", lambda child: False)
    registry, counter, histogram = metrics()
    stats = LookupStats(counter, histogram, ("subscribe",))
    stats.record("subscribe", "ok", 0.002)
    assert value(registry, "t_lookups_total", action="subscribe", outcome="ok") == 1
    assert value(registry, "t_lookup_seconds_count", action="subscribe") == 1
    stats.flush()
    assert value(registry, "t_lookups_total", action="subscribe", outcome="ok") == 1


def test_this_prometheus_client_takes_batches():
    _, _, histogram = metrics()
    assert lookupstats._adds_in_batches(histogram.labels("subscribe"))


def test_lookups_recorded_while_a_flush_runs_are_each_counted_once():
    import threading

    registry, counter, histogram = metrics()
    stats = LookupStats(counter, histogram, ("subscribe",))
    done = threading.Event()

    def flusher():
        while not done.is_set():
            stats.flush()

    def lookups():
        for _ in range(20_000):
            stats.record("subscribe", "ok", 0.0002)

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    background = threading.Thread(target=flusher)
    background.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    background.join()
    stats.flush()
    assert value(registry, "t_lookups_total", action="subscribe", outcome="ok") == 80_000
    assert value(registry, "t_lookup_seconds_bucket", action="subscribe", le="0.0005") == 80_000
