"""The scaling decision is a pure function of (now, groups, instances, nodes, last evaluations): these
tests hand it built records and explicit clocks, and replay a whole day of load in a few milliseconds."""
import itertools

import pytest

from dataclasses import replace

from streammanager.autoscaler import (
    ABSENCE_GRACE_MS,
    DESTROY_FAILED,
    GONE_KEPT_MS,
    REQUEST_TIMEOUT_MS,
    TERMINATE_RETRY_MS,
    plan,
)
from streammanager.groups import (
    DRAINING,
    FAILED,
    GONE,
    INSERVICE,
    REQUESTED,
    STARTING,
    TERMINATING,
    InstanceRecord,
    NodeGroup,
)
from streammanager.models import NodeRecord, StreamLoad

NOW = 1_800_000_000_000
S = 1000  # ms
LONG_AGO = NOW - 3600 * S
REGION = "us-east-1"
CAPACITY = 10  # per node, origins and edges alike


def group(name="g", min=1, max=4, increment=1, role="edge", regions=(REGION,), **policy) -> NodeGroup:
    defaults = {"scaleOutAt": 0.6, "scaleInBelow": 0.2, "evaluationIntervalS": 2, "warmUpS": 5, "coolDownS": 10,
                "drainTimeoutS": 60, "bootTimeoutS": 120, "failureBudget": 3, "failureWindowS": 600}
    return NodeGroup.from_api({
        "name": name,
        "launchConfig": {"provider": "local", "media": "none", "capacity": {"origin": CAPACITY, "edge": CAPACITY}},
        "regions": {r: {role: {"min": min, "max": max, "increment": increment}} for r in regions},
        "scalePolicy": {**defaults, **policy},
    })


def instance(id, state=INSERVICE, since=LONG_AGO, created=LONG_AGO, registered=None, role="edge", region=REGION,
             group="g", provider_id=None, **kw) -> InstanceRecord:
    if registered is None:
        registered = since if state in (INSERVICE, DRAINING) else 0
    return InstanceRecord(id=id, group=group, region=region, role=role, provider="local", state=state,
                          provider_id=f"p-{id}" if provider_id is None else provider_id, created_ms=created,
                          state_since_ms=since, registered_ms=registered, **kw)


def node(id, used=0, capacity=CAPACITY, state="inservice", role="edge", region=REGION, group="g",
         started=LONG_AGO) -> NodeRecord:
    if role == "origin":  # an origin's load is its publishers, an edge's its viewers
        streams = {f"live/s{i}": StreamLoad(0, 0, True, 1) for i in range(used)}
    else:
        streams = {"live/s": StreamLoad(used, 0, True, 1)} if used else {}
    return NodeRecord(id=id, group=group, region=region, role=role, host=f"h-{id}", rtmp_port=1935,
                      agent_url=f"http://h-{id}:8090", capacity=capacity, state=state, streams=streams,
                      updated_ms=NOW, started_ms=started)


def serving(*loads, **kw):
    """In-service instances n1, n2, ... with registered nodes carrying ``loads``."""
    records = {f"n{i}": instance(f"n{i}", **kw) for i in range(1, len(loads) + 1)}
    nodes = {f"n{i}": node(f"n{i}", used, started=LONG_AGO + i) for i, used in enumerate(loads, 1)}
    return records, nodes


def decide(groups, instances=(), nodes=(), now=NOW, last=None):
    if isinstance(groups, NodeGroup):
        groups = [groups]
    instances = instances if isinstance(instances, dict) else {r.id: r for r in instances}
    nodes = nodes if isinstance(nodes, dict) else {n.id: n for n in nodes}
    return plan(now, groups, instances, nodes, last)


def moved(result, instance_id):
    found = [m for m in result.moves if m.record.id == instance_id]
    assert found, f"no move of {instance_id} in {result.moves}"
    return found[-1]


def destroyed(result):
    return sorted(d.record.id for d in result.destroys)


def holds(result):
    return [h.reason for h in result.holds]


# -- growing -------------------------------------------------------------------------------------------
def test_an_empty_pool_below_min_launches_up_to_min_at_once():
    result = decide(group(min=3, increment=1))
    assert len(result.launches) == 3
    assert {(l.group, l.region, l.role) for l in result.launches} == {("g", REGION, "edge")}
    assert all("below min 3" in l.reason for l in result.launches)


def test_a_pool_below_min_launches_only_the_missing_nodes_counting_those_still_starting():
    records = {"s1": instance("s1", STARTING, since=NOW - 5 * S, created=NOW - 5 * S)}
    result = decide(group(min=3), records)
    assert len(result.launches) == 2


def test_a_pool_at_min_with_idle_nodes_does_nothing():
    records, nodes = serving(1)
    result = decide(group(min=1), records, nodes)
    assert result.empty and not result.holds


def test_a_pool_at_the_scale_out_threshold_grows_by_its_increment():
    records, nodes = serving(6, 6)  # 12 of 20: exactly 0.6
    result = decide(group(increment=2, max=10), records, nodes)
    assert len(result.launches) == 2
    assert "load 0.60 >= 0.6" in result.launches[0].reason


def test_a_pool_just_below_the_scale_out_threshold_does_not_grow():
    records, nodes = serving(6, 5)  # 0.55
    assert decide(group(increment=2, max=10), records, nodes).launches == []


def test_growth_stops_at_max_even_when_the_increment_is_larger():
    records, nodes = serving(9, 9, 9)
    result = decide(group(increment=5, max=4), records, nodes)
    assert len(result.launches) == 1


def test_a_full_pool_at_max_holds_and_says_why():
    records, nodes = serving(10, 10, 10, 10)
    result = decide(group(max=4), records, nodes)
    assert result.launches == []
    assert any("at max 4" in h for h in holds(result))


def test_growth_counts_draining_nodes_against_max():
    # one node in service at 0.8, one still draining with its last viewers: both run, max is 2
    records = {"n1": instance("n1"), "d1": instance("d1", DRAINING, since=NOW - 20 * S, drain_deadline_ms=NOW + 40 * S)}
    nodes = {"n1": node("n1", used=8), "d1": node("d1", used=3, state="draining")}
    result = decide(group(min=1, max=2), records, nodes)
    assert result.launches == []
    assert any("at max 2 (1 draining)" in h for h in holds(result))
    assert len(decide(group(min=1, max=3, increment=3), records, nodes).launches) == 1


def test_a_pool_holds_while_a_launched_node_is_still_starting():
    records, nodes = serving(10, 10)
    records["s1"] = instance("s1", STARTING, since=NOW - 20 * S, created=NOW - 20 * S)
    result = decide(group(), records, nodes)  # 20 of 30, counting the starting node's capacity
    assert result.launches == []
    assert any("waiting for 1 node(s) to start" in h for h in holds(result))


def test_a_pool_holds_during_warm_up_after_a_node_enters_service_then_grows():
    records, nodes = serving(10, 10)
    records["n2"] = instance("n2", since=NOW - 2 * S, registered=NOW - 2 * S, created=NOW - 30 * S)
    during = decide(group(warmUpS=5), records, nodes)
    assert during.launches == []
    assert any("warming up" in h for h in holds(during))
    after = decide(group(warmUpS=5), records, nodes, now=NOW + 3 * S)
    assert len(after.launches) == 1


def test_a_hand_registered_node_adds_capacity_but_does_not_count_towards_the_pool_size():
    records, nodes = serving(8)
    nodes["manual"] = node("manual", used=0)  # no instance record: an operator started it
    result = decide(group(min=1), records, nodes)
    assert result.launches == []  # 8 of 20
    assert (result.pools[0].active, result.pools[0].capacity, result.pools[0].used) == (1, 20, 8)


def test_each_pool_reports_its_size_and_load():
    records, nodes = serving(3, 5)
    records["s1"] = instance("s1", STARTING, since=NOW - S, created=NOW - S)
    records["d1"] = instance("d1", DRAINING, drain_deadline_ms=NOW + 60 * S)
    nodes["d1"] = node("d1", used=2, state="draining")
    status = decide(group(max=10), records, nodes).pools[0]
    assert (status.active, status.in_service, status.draining, status.used, status.capacity) == (3, 2, 1, 8, 30)
    assert status.utilization == pytest.approx(8 / 30)


# -- lifecycle -----------------------------------------------------------------------------------------
def test_a_registered_node_moves_its_instance_from_starting_to_inservice():
    records = {"s1": instance("s1", STARTING, since=NOW - 30 * S, created=NOW - 30 * S)}
    result = decide(group(), records, [node("s1")])
    move = moved(result, "s1")
    assert (move.record.state, move.record.registered_ms, move.record.state_since_ms) == (INSERVICE, NOW, NOW)
    assert not move.drain


def test_a_starting_instance_waits_for_its_node_until_the_boot_timeout():
    records = {"s1": instance("s1", STARTING, since=NOW - 120 * S + 1, created=NOW - 120 * S + 1)}
    result = decide(group(bootTimeoutS=120), records)
    assert result.moves == [] and result.destroys == []


def test_a_starting_instance_that_never_registers_fails_at_its_boot_timeout_and_is_destroyed():
    records = {"s1": instance("s1", STARTING, since=NOW - 120 * S, created=NOW - 120 * S)}
    result = decide(group(bootTimeoutS=120), records)
    move = moved(result, "s1")
    assert (move.record.state, move.record.failure) == (FAILED, "boot timeout")
    assert destroyed(result) == ["s1"]
    assert len(result.launches) == 1  # the pool is below min again: a new attempt


def test_an_inservice_instance_whose_node_vanished_fails_is_destroyed_and_is_replaced_in_the_same_plan():
    records, nodes = serving(3)
    result = plan(NOW, [group(min=1)], records, {}, absent_since={"n1": NOW - ABSENCE_GRACE_MS})
    move = moved(result, "n1")
    assert move.record.state == FAILED and "vanished 15 s ago" in move.record.reason
    assert destroyed(result) == ["n1"]
    assert len(result.launches) == 1 and "below min" in result.launches[0].reason


@pytest.mark.parametrize("absent_since", [None, {}, {"n1": NOW - ABSENCE_GRACE_MS + 1}])
def test_an_inservice_node_missing_from_the_registry_for_less_than_the_grace_is_waited_for(absent_since):
    # a ZooKeeper outage longer than the session timeout expires every agent's session at once; they
    # register again on new ones moments later: taken for dead, every node was destroyed and replaced
    records, _ = serving(3)
    result = plan(NOW, [group(min=1)], records, {}, absent_since=absent_since)
    assert not result.moves and not result.destroys


def test_the_absence_grace_is_the_operators_setting():
    records, _ = serving(3)
    absent = {"n1": NOW - 3000}  # missing for 3 s
    assert not plan(NOW, [group(min=1)], records, {}, absent_since=absent).moves  # the default grace: waited for
    result = plan(NOW, [group(min=1)], records, {}, absent_since=absent, absence_grace_ms=3000)
    assert moved(result, "n1").record.state == FAILED and destroyed(result) == ["n1"]


def test_a_request_the_provider_never_confirmed_is_given_up_and_counted_as_a_failure():
    records = {"r1": instance("r1", REQUESTED, since=NOW - REQUEST_TIMEOUT_MS, created=NOW - REQUEST_TIMEOUT_MS,
                              provider_id="")}
    result = decide(group(min=0), records)
    move = moved(result, "r1")
    assert (move.record.state, move.record.failure) == (GONE, "launch not confirmed")
    assert result.destroys == []  # nothing to destroy: the provider never gave it an id


def test_a_request_with_a_provider_id_whose_starting_write_was_lost_moves_to_starting():
    records = {"r1": instance("r1", REQUESTED, since=NOW - S, created=NOW - S)}
    assert moved(decide(group(min=0), records), "r1").record.state == STARTING


def test_a_node_an_operator_sunset_moves_its_instance_to_draining_with_the_drain_deadline():
    records, nodes = serving(4, 4)
    nodes["n1"] = nodes["n1"].with_changes(state="draining")
    result = decide(group(drainTimeoutS=60), records, nodes)
    move = moved(result, "n1")
    assert (move.record.state, move.record.drain_deadline_ms) == (DRAINING, NOW + 60 * S)
    assert not move.drain  # the agent drains already


def test_a_starting_instance_whose_node_registers_already_draining_moves_to_draining():
    records = {"s1": instance("s1", STARTING, since=NOW - 5 * S, created=NOW - 5 * S)}
    move = moved(decide(group(min=0), records, [node("s1", state="draining")]), "s1")
    assert move.record.state == DRAINING and move.record.registered_ms == NOW


def test_a_draining_instance_is_terminated_when_its_node_is_empty():
    records = {"d1": instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)}
    result = decide(group(min=0), records, [node("d1", used=0, state="draining")])
    assert moved(result, "d1").record.state == TERMINATING
    assert destroyed(result) == ["d1"]


@pytest.mark.parametrize("absent_since", [None, {}, {"d1": NOW - ABSENCE_GRACE_MS + 1}])
def test_a_draining_node_missing_from_the_registry_for_less_than_the_grace_is_waited_for(absent_since):
    # a draining node still serves (it ends when empty); a ZooKeeper outage past the session timeout
    # expires its session like any other's, and it registers again moments later: it was terminated
    # ("drained: its node left") with its live streams in the step that found it missing
    records = {"d1": instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)}
    result = plan(NOW, [group(min=0)], records, {}, absent_since=absent_since)
    assert not result.moves and not result.destroys


def test_a_draining_node_missing_from_the_registry_past_the_grace_or_its_deadline_is_terminated():
    records = {"d1": instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)}
    gone = plan(NOW, [group(min=0)], records, {}, absent_since={"d1": NOW - ABSENCE_GRACE_MS})
    assert moved(gone, "d1").record.state == TERMINATING and destroyed(gone) == ["d1"]
    late = plan(NOW + 55 * S, [group(min=0)], records, {}, absent_since={"d1": NOW + 55 * S - 1})
    assert moved(late, "d1").record.state == TERMINATING and destroyed(late) == ["d1"]


def test_a_draining_instance_with_viewers_left_is_kept_until_its_drain_deadline():
    records = {"d1": instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)}
    nodes = [node("d1", used=3, state="draining")]
    before = decide(group(min=0), records, nodes, now=NOW + 55 * S - 1)
    assert before.moves == [] and before.destroys == []
    at = decide(group(min=0), records, nodes, now=NOW + 55 * S)
    assert moved(at, "d1").record.state == TERMINATING and "deadline" in moved(at, "d1").record.reason
    assert destroyed(at) == ["d1"]


def test_a_draining_instance_whose_node_left_is_terminated():
    records = {"d1": instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)}
    result = plan(NOW, [group(min=0)], records, {}, absent_since={"d1": NOW - ABSENCE_GRACE_MS})
    assert moved(result, "d1").record.state == TERMINATING and destroyed(result) == ["d1"]


def test_a_destroy_the_provider_has_not_confirmed_is_retried_but_not_on_every_call():
    failed = replace(instance("t1", TERMINATING, since=NOW - TERMINATE_RETRY_MS + 1),
                     reason=f"{DESTROY_FAILED}: provider unreachable")
    records = {"t1": failed}
    assert decide(group(min=0), records).destroys == []
    retry = decide(group(min=0), records, now=NOW + 1)
    assert destroyed(retry) == ["t1"] and retry.moves == []


def test_a_terminating_instance_that_never_launched_is_gone_without_a_destroy():
    records = {"t1": instance("t1", TERMINATING, since=NOW - S, provider_id="")}
    result = decide(group(min=0), records)
    assert moved(result, "t1").record.state == GONE and result.destroys == []


def test_a_gone_instance_is_forgotten_a_minute_later_but_not_before():
    records = {"x1": instance("x1", GONE, since=NOW - GONE_KEPT_MS + 1)}
    assert decide(group(min=0), records).forgets == []
    assert [f.instance_id for f in decide(group(min=0), records, now=NOW + 1).forgets] == ["x1"]


def test_a_failed_gone_instance_is_kept_for_the_failure_window_so_that_it_counts():
    records = {"x1": instance("x1", GONE, since=NOW - 300 * S, failure="boot timeout")}
    assert decide(group(min=0, failureWindowS=600), records).forgets == []
    later = decide(group(min=0, failureWindowS=600), records, now=NOW + 300 * S)
    assert [f.instance_id for f in later.forgets] == ["x1"]


def test_instances_of_a_deleted_group_drain_and_ask_their_agents_to_drain():
    records = {"n1": instance("n1", INSERVICE), "s1": instance("s1", STARTING, since=NOW - S, created=NOW - S)}
    result = decide([], records, [node("n1", used=4)])
    for instance_id in ("n1", "s1"):
        move = moved(result, instance_id)
        assert move.record.state == DRAINING and move.drain
        assert move.record.drain_deadline_ms > NOW  # its viewers get time to leave
    assert result.launches == [] and result.pools == []


def test_instances_of_a_region_or_role_removed_from_their_group_drain_like_a_deleted_groups():
    both = group(regions=(REGION, "eu-west-1"))
    records = {"n1": instance("n1", INSERVICE), "e1": instance("e1", INSERVICE, region="eu-west-1"),
               "s1": instance("s1", STARTING, since=NOW - S, created=NOW - S, region="eu-west-1")}
    nodes = [node("n1"), node("e1", used=4, region="eu-west-1")]
    assert decide([both], records, nodes).moves == []
    result = decide([group()], records, nodes)  # PUT: eu-west-1 is no longer a region of the group
    for instance_id in ("e1", "s1"):
        move = moved(result, instance_id)
        assert move.record.state == DRAINING and move.drain
        assert move.record.drain_deadline_ms > NOW
    assert not any(m.record.id == "n1" for m in result.moves)
    origin_only = group(role="origin")  # the same for a role the region no longer has
    assert moved(decide([origin_only], {"n1": records["n1"]}, [node("n1")]), "n1").record.state == DRAINING


def test_a_deleted_groups_draining_node_with_viewers_is_terminated_at_its_deadline_and_when_empty():
    records = {"n1": instance("n1", INSERVICE)}
    first = moved(decide([], records, [node("n1", used=4)]), "n1").record
    records = {"n1": first}
    assert decide([], records, [node("n1", used=4, state="draining")], now=NOW + S).moves == []
    assert moved(decide([], records, [node("n1", used=0, state="draining")], now=NOW + S), "n1").record.state \
        == TERMINATING
    at_deadline = decide([], records, [node("n1", used=4, state="draining")], now=first.drain_deadline_ms)
    assert moved(at_deadline, "n1").record.state == TERMINATING


# -- shrinking -----------------------------------------------------------------------------------------
def test_an_idle_pool_above_min_drains_its_least_loaded_node():
    records, nodes = serving(1, 0, 2)
    result = decide(group(min=1, drainTimeoutS=60), records, nodes)
    move = moved(result, "n2")
    assert move.drain and move.record.state == DRAINING
    assert move.record.drain_deadline_ms == NOW + 60 * S
    assert len(result.moves) == 1 and result.destroys == []  # one node per evaluation, nothing killed


def test_an_idle_pool_does_not_shrink_during_the_cool_down_after_a_launch():
    records, nodes = serving(0, 0)
    records["n2"] = instance("n2", created=NOW - 9 * S, since=NOW - 4 * S)
    result = decide(group(coolDownS=10), records, nodes)
    assert result.moves == []
    assert any("cooling down" in h for h in holds(result))
    assert moved(decide(group(coolDownS=10), records, nodes, now=NOW + S), "n1").record.state == DRAINING


def test_an_idle_pool_does_not_shrink_during_the_cool_down_after_a_drain():
    records, nodes = serving(0, 0, 0)
    records["d1"] = instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)
    nodes["d1"] = node("d1", used=1, state="draining")
    assert decide(group(coolDownS=10), records, nodes).moves == []


def test_an_idle_pool_at_min_never_drains():
    records, nodes = serving(0, 0)
    result = decide(group(min=2), records, nodes)
    assert result.moves == [] and result.holds == []


def test_an_idle_pool_does_not_shrink_while_a_node_is_starting():
    records, nodes = serving(0, 0)
    records["s1"] = instance("s1", STARTING, since=NOW - S, created=LONG_AGO)
    assert decide(group(min=1), records, nodes).moves == []


def test_scale_in_is_refused_when_removing_the_node_would_push_the_pool_over_the_scale_out_threshold():
    records, nodes = serving(4, 3)  # 7 of 20 = 0.35 < 0.5, but 7 of 10 >= 0.6
    result = decide(group(min=1, scaleInBelow=0.5, scaleOutAt=0.6), records, nodes)
    assert result.moves == []
    assert any("would push the pool" in h for h in holds(result))


def test_scale_in_goes_ahead_when_the_remaining_nodes_stay_under_the_threshold():
    records, nodes = serving(3, 2)  # 5 of 20 < 0.5; 5 of 10 < 0.6
    result = decide(group(min=1, scaleInBelow=0.5, scaleOutAt=0.6), records, nodes)
    assert moved(result, "n2").record.state == DRAINING


def test_a_pool_above_max_after_an_update_removes_starting_nodes_first_then_drains_the_least_loaded():
    records, nodes = serving(5, 1, 3)
    records["s1"] = instance("s1", STARTING, since=NOW - S, created=NOW - S)
    result = decide(group(min=1, max=2), records, nodes)
    assert moved(result, "s1").record.state == TERMINATING and destroyed(result) == ["s1"]
    drain = moved(result, "n2")
    assert drain.record.state == DRAINING and drain.drain
    assert {m.record.id for m in result.moves} == {"s1", "n2"}


def test_a_pool_one_over_max_removes_only_the_starting_node():
    records, nodes = serving(5, 1, 3)
    records["s1"] = instance("s1", STARTING, since=NOW - S, created=NOW - S)
    result = decide(group(min=1, max=3), records, nodes)
    assert {m.record.id for m in result.moves} == {"s1"}


def test_a_pool_above_max_drops_an_unconfirmed_request_without_a_destroy():
    records, nodes = serving(0, 0)
    records["r1"] = instance("r1", REQUESTED, since=NOW - S, created=NOW - S, provider_id="")
    result = decide(group(min=1, max=2), records, nodes)
    assert moved(result, "r1").record.state == GONE and result.destroys == []


# -- the failure budget --------------------------------------------------------------------------------
def failed_launches(count, created, region=REGION):
    return {f"f{i}{region}": instance(f"f{i}{region}", GONE, since=created, created=created, region=region,
                                      failure="boot timeout") for i in range(count)}


def test_after_the_failure_budget_of_failed_launches_a_regions_launches_are_held():
    records = failed_launches(3, NOW - 100 * S)
    result = decide(group(min=2, failureBudget=3, failureWindowS=600), records)
    assert result.launches == []
    assert any("paused" in h and "3 failed launches" in h for h in holds(result))


def test_launches_below_the_failure_budget_go_ahead():
    records = failed_launches(2, NOW - 100 * S)
    assert len(decide(group(min=2, failureBudget=3), records).launches) == 2


def test_launches_resume_once_the_failures_leave_the_window():
    records = failed_launches(3, NOW - 600 * S)
    assert len(decide(group(min=2, failureBudget=3, failureWindowS=600), records).launches) == 2


def test_a_spent_failure_budget_pauses_only_its_own_region():
    records = failed_launches(3, NOW - 100 * S, region="eu-west-1")
    result = decide(group(min=1, regions=(REGION, "eu-west-1")), records)
    assert [l.region for l in result.launches] == [REGION]


def test_a_spent_failure_budget_also_holds_scale_out():
    records, nodes = serving(9, 9)
    records.update(failed_launches(3, NOW - 100 * S))
    result = decide(group(max=4), records, nodes)
    assert result.launches == [] and any("paused" in h for h in holds(result))


# -- evaluation interval ------------------------------------------------------------------------------
def test_scaling_is_decided_at_most_once_per_evaluation_interval_while_lifecycle_changes_happen_every_call():
    g = group(evaluationIntervalS=2, max=10)
    records, nodes = serving(9, 9)  # 0.9: the pool wants to grow
    records["d1"] = instance("d1", DRAINING, since=NOW - 5 * S, drain_deadline_ms=NOW + 55 * S)
    nodes["d1"] = node("d1", used=0, state="draining")
    last = {"g": NOW - 1 * S}
    early = decide(g, records, nodes, last=last)
    assert early.launches == [] and early.holds == [] and "g" not in early.evaluated
    assert moved(early, "d1").record.state == TERMINATING  # the end of a drain is not held back
    due = decide(g, records, nodes, now=NOW + 1 * S, last=last)
    assert due.evaluated == {"g": NOW + 1 * S}
    assert len(due.launches) == 1


def test_the_first_call_evaluates_every_group():
    records, nodes = serving(9, 9)
    result = decide([group("a", max=10), group("b", min=0)], records, nodes)
    assert result.evaluated == {"a": NOW, "b": NOW}
    assert len(result.launches) == 1


def test_the_floor_is_held_between_evaluations():
    result = decide(group(min=2), last={"g": NOW})
    assert len(result.launches) == 2


# -- a replayed timeline -------------------------------------------------------------------------------
class Cluster:
    """A tiny simulator: applies each plan the way the controller and the agents would."""

    def __init__(self, group: NodeGroup, boot_s: int = 4):
        self.group = group
        self.boot_ms = boot_s * S
        self.instances: dict[str, InstanceRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.last: dict[str, int] = {}
        self._ids = itertools.count(1)

    def step(self, now: int, demand: int):
        self._register(now)
        self._spread(demand)
        result = plan(now, [self.group], self.instances, self.nodes, self.last)
        self.last.update(result.evaluated)
        for move in result.moves:
            self.instances[move.record.id] = move.record
            if move.drain and move.record.id in self.nodes:  # the agent drains: no new viewers
                self.nodes[move.record.id] = self.nodes[move.record.id].with_changes(state="draining")
        for destroy in result.destroys:
            self.instances[destroy.record.id] = destroy.record.moved(GONE, now, destroy.record.reason)
            self.nodes.pop(destroy.record.id, None)
        for forget in result.forgets:
            del self.instances[forget.instance_id]
        for launch in result.launches:
            instance_id = f"i{next(self._ids)}"
            self.instances[instance_id] = InstanceRecord(
                id=instance_id, group=launch.group, region=launch.region, role=launch.role, provider="local",
                state=STARTING, provider_id=f"p-{instance_id}", created_ms=now, state_since_ms=now,
                reason=launch.reason)
        return result

    def active(self) -> int:
        return sum(1 for r in self.instances.values() if r.state in (REQUESTED, STARTING, INSERVICE))

    def _register(self, now: int) -> None:
        for record in self.instances.values():
            if record.state == STARTING and record.id not in self.nodes and now - record.created_ms >= self.boot_ms:
                self.nodes[record.id] = node(record.id, used=0, started=now)

    def _spread(self, demand: int) -> None:
        """Viewers on draining nodes leave by half each step; the rest play from in-service nodes."""
        draining = {i: n.with_changes(streams=_viewers(n.used // 2))
                    for i, n in self.nodes.items() if n.state == "draining"}
        remaining = max(0, demand - sum(n.used for n in draining.values()))
        open_nodes = sorted(i for i, n in self.nodes.items() if n.state == "inservice")
        self.nodes.update(draining)
        for k, node_id in enumerate(open_nodes):
            share = remaining // len(open_nodes) + (1 if k < remaining % len(open_nodes) else 0)
            self.nodes[node_id] = self.nodes[node_id].with_changes(streams=_viewers(min(share, CAPACITY)))


def _viewers(count: int) -> dict:
    return {"live/s": StreamLoad(count, 0, True, 1)} if count else {}


def demand_at(t_s: int) -> int:
    """Rising to 38 viewers (needs 4 nodes of 10) over 100 s, holding 50 s, falling to 0 by 250 s."""
    if t_s < 100:
        return 38 * t_s // 100
    if t_s < 150:
        return 38
    if t_s < 250:
        return 38 * (250 - t_s) // 100
    return 0


def test_a_replayed_rise_and_fall_of_load_grows_to_max_and_ends_back_at_min_never_leaving_the_bounds():
    g = group(min=1, max=4, increment=1)
    cluster = Cluster(g)
    sizes = []
    for t_s in range(0, 500):
        cluster.step(NOW + t_s * S, demand_at(t_s))
        sizes.append(cluster.active())
    limits = g.regions[REGION]["edge"]
    assert all(limits.min <= size <= limits.max for size in sizes), sizes
    assert max(sizes) == limits.max
    assert sizes[-1] == limits.min
    # everything else was drained, terminated and forgotten
    assert [r.state for r in cluster.instances.values()] == [INSERVICE]
    assert len(cluster.nodes) == 1
    # and nothing ever failed along the way
    assert not any(r.failure for r in cluster.instances.values())


def test_a_replayed_timeline_where_every_node_dies_at_boot_stops_launching_after_the_failure_budget():
    g = group(min=2, max=4, bootTimeoutS=30, failureBudget=3, failureWindowS=600)
    cluster = Cluster(g, boot_s=10_000)  # nodes never register
    launched = 0
    for t_s in range(0, 300):
        launched += len(cluster.step(NOW + t_s * S, demand=0).launches)
    assert launched == 4  # two at once, two more after the first two failed; then the budget is spent


def test_an_instance_an_operator_removed_is_destroyed_at_once():
    records = {"t1": replace(instance("t1", TERMINATING, since=NOW - 1), reason="removed by an operator")}
    assert destroyed(decide(group(min=0), records)) == ["t1"]


def test_an_idle_pool_at_min_0_keeps_its_last_node_and_says_why():
    records, nodes = serving(0)
    result = decide(group(min=0), records, nodes)
    assert result.moves == []
    (reason,) = holds(result)
    assert "last serving node" in reason and "no load to grow on" in reason
    assert "scale-out threshold" not in reason  # what it said before: not the reason at all


def test_an_instance_whose_node_record_does_not_decode_is_alive_not_dead():
    """Its agent is registered (``unreadable``: its znode is there, the record another version's, e.g. a
    newer agent's during a rolling upgrade): neither failed and destroyed, nor failed at its boot timeout;
    a drain deadline still holds."""
    records = {"n1": instance("n1"),
               "n2": instance("n2", STARTING, since=NOW - 200 * S, created=NOW - 200 * S),
               "n3": instance("n3", DRAINING, drain_deadline_ms=NOW - S)}
    long_gone = {"n1": NOW - ABSENCE_GRACE_MS}
    dead = plan(NOW, [group(min=1)], records, {}, absent_since=long_gone)
    assert sorted(destroyed(dead)) == ["n1", "n2", "n3"]  # no registration at all: dead (or drained)
    alive = plan(NOW, [group(min=1)], records, {}, unreadable={"n1", "n2", "n3"}, absent_since=long_gone)
    assert destroyed(alive) == ["n3"]  # its drain deadline passed
    assert moved(alive, "n2").record.state == INSERVICE
    assert "n1" not in {m.record.id for m in alive.moves}
    assert alive.launches == []
