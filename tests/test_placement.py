"""Answers count against their node until load reports can show them, then stop counting."""
from streammanager.placement import Assignments

T0 = 1_800_000_000_000
TTL = 3000
LATE = 2 * Assignments.BUCKET_MS  # how much longer than the ttl an answer may count


def test_an_answer_counts_for_the_ttl_and_stops_at_most_two_buckets_later():
    pending = Assignments(ttl_ms=TTL)
    answers = [("a", T0 + i * 250) for i in range(5)] + [("b", T0 + 500)]
    for node, at in sorted(answers, key=lambda answer: answer[1]):  # as the clock gives them
        pending.add(node, at)
    for now in range(T0 + 1000, T0 + 1000 + TTL + LATE + 100, 50):
        counts = pending.snapshot(now)
        for node in ("a", "b"):
            surely = sum(1 for n, at in answers if n == node and now < at + TTL)
            maybe = sum(1 for n, at in answers if n == node and now < at + TTL + LATE)
            assert surely <= counts.get(node, 0) <= maybe, (node, now - T0)
    assert dict(pending.snapshot(T0 + 1000 + TTL + LATE)) == {}


def test_each_answer_stops_counting_once_however_many_nodes_are_answered():
    pending = Assignments(ttl_ms=1000)
    for step in range(100):  # 10 s of answers, ten every 100 ms, over 50 nodes
        now = T0 + step * 100
        for n in range(10):
            pending.add(f"n{(step * 10 + n) % 50}", now)
        counted = sum(pending.snapshot(now).get(f"n{i}", 0) for i in range(50))
        if step >= 10:  # the last second's 100 answers, and at most two buckets more
            assert 100 <= counted <= 120
    assert dict(pending.snapshot(T0 + 100 * 100 + 1000 + LATE)) == {}
