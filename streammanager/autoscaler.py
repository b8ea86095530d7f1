"""The scaling decision: a pure function from (groups, instances, registered nodes, now) to a plan.

Shaped after the Kubernetes cluster-autoscaler's ``RunOnce``: time is passed in, every timer
(warm-up, cool-down, drain deadline, boot timeout, failure window) is computed from timestamps in
the instance records, so a new leader replays the same decisions from the same registry. The plan
says what to do (launch, move an instance to a new lifecycle state, destroy, forget) and, for every
pool it left alone while its load asked for a change, why (a :class:`Hold`).

No ZooKeeper, libcloud or Flask here: the controller gathers the inputs and carries out the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping

from streammanager.groups import (
    ACTIVE,
    DRAINING,
    FAILED,
    GONE,
    INSERVICE,
    REQUESTED,
    STARTING,
    TERMINATING,
    InstanceRecord,
    NodeGroup,
    PoolLimits,
    ScalePolicy,
)
from streammanager.models import STATE_DRAINING, STATE_INSERVICE, NodeRecord

REQUEST_TIMEOUT_MS = 60_000  # a launch the provider never confirmed
TERMINATE_RETRY_MS = 10_000  # how often a failing destroy is retried
# An in-service node whose registration is gone is taken for dead (destroyed, replaced) only after this
# long: a ZooKeeper outage longer than the session timeout expires every agent's session at once, and
# the agents register again on new ones a second or two after it; the controller destroyed them all.
# The default of SM_ABSENCE_GRACE_S.
ABSENCE_GRACE_MS = 15_000
GONE_KEPT_MS = 60_000  # a gone instance without failure is listed this long, then forgotten
DESTROY_FAILED = "destroy failed"  # reason prefix the controller writes after a failed attempt


@dataclass(frozen=True, slots=True)
class Launch:
    group: str
    region: str
    role: str
    reason: str


@dataclass(frozen=True, slots=True)
class Move:
    """Write ``record`` (a lifecycle change of an existing instance). ``drain`` asks its agent to drain."""

    record: InstanceRecord
    drain: bool = False


@dataclass(frozen=True, slots=True)
class Destroy:
    record: InstanceRecord  # in terminating or failed; gone once the provider confirms


@dataclass(frozen=True, slots=True)
class Forget:
    instance_id: str


@dataclass(frozen=True, slots=True)
class Hold:
    group: str
    region: str
    role: str
    reason: str


@dataclass(frozen=True, slots=True)
class PoolStatus:
    group: str
    region: str
    role: str
    active: int  # requested + starting + in service
    in_service: int
    draining: int
    used: int
    capacity: int

    @property
    def utilization(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    destroys: list[Destroy] = field(default_factory=list)
    forgets: list[Forget] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    # draining instances whose node is not draining: its agent was never told (the leader died between
    # writing the record and queueing the command, or the command could not be queued) or forgot
    drains: list[InstanceRecord] = field(default_factory=list)
    pools: list[PoolStatus] = field(default_factory=list)
    evaluated: dict[str, int] = field(default_factory=dict)  # group -> when its policy was evaluated

    @property
    def empty(self) -> bool:
        return not (self.launches or self.moves or self.destroys or self.forgets)


def plan(now_ms: int, groups: Iterable[NodeGroup], instances: Mapping[str, InstanceRecord],
         nodes: Mapping[str, NodeRecord], last_evaluated: Mapping[str, int] | None = None,
         unreadable: Collection[str] = (), absent_since: Mapping[str, int] | None = None,
         absence_grace_ms: int = ABSENCE_GRACE_MS) -> Plan:
    """Decide. ``last_evaluated`` (group -> ms) keeps each group's scaling decisions to its evaluation
    interval; lifecycle changes (registration, death, drain end, timeouts) are decided every call.
    ``unreadable``: ids of nodes that are registered but whose record does not decode (another version's
    agent during an upgrade): alive, not dead. ``absent_since`` (id -> ms): since when an in-service
    or draining instance's node has been missing from the registry, as the caller saw it; one missing for less than
    ``absence_grace_ms`` (or not in it: just missed) is waited for."""
    result = Plan()
    groups_by_name = {g.name: g for g in groups}
    current: dict[str, InstanceRecord] = {}
    for record in instances.values():
        absent_ms = now_ms - (absent_since or {}).get(record.id, now_ms)
        moved = _lifecycle(now_ms, record, groups_by_name.get(record.group), nodes.get(record.id), result,
                           record.id in unreadable, absent_ms, absence_grace_ms)
        if moved.state == FAILED and moved is not record and not moved.provider_id:
            moved = record.moved(GONE, now_ms, moved.reason, failure=moved.failure)
            result.moves[-1] = Move(moved)
        if _destroy_due(now_ms, record, moved):
            result.destroys.append(Destroy(moved))
        current[record.id] = moved

    by_pool: dict[tuple[str, str, str], list[InstanceRecord]] = {}
    for record in current.values():
        by_pool.setdefault((record.group, record.region, record.role), []).append(record)
    unmanaged: dict[tuple[str, str, str], list[NodeRecord]] = {}
    for node in nodes.values():
        if node.id not in current:
            unmanaged.setdefault((node.group, node.region, node.role), []).append(node)

    last_evaluated = last_evaluated or {}
    for group in groups_by_name.values():
        interval_ms = int(group.policy.evaluation_interval_s * 1000)
        due = now_ms - last_evaluated.get(group.name, -interval_ms) >= interval_ms
        if due:
            result.evaluated[group.name] = now_ms
        spent = _failure_budget_spent(now_ms, group, current.values())
        for region, role, limits in group.pools():
            pool = (group.name, region, role)
            _scale_pool(now_ms, group, region, role, limits, by_pool.get(pool, []), unmanaged.get(pool, []),
                        nodes, due, region in spent, result)
    return result


# -- lifecycle ---------------------------------------------------------------------------------------
def _lifecycle(now: int, record: InstanceRecord, group: NodeGroup | None, node: NodeRecord | None,
               result: Plan, unreadable: bool = False, absent_ms: int = 0,
               grace_ms: int = ABSENCE_GRACE_MS) -> InstanceRecord:
    """Advance one instance through its lifecycle; returns the record as it will be. ``unreadable``: its
    node is registered, but its record does not decode (``node`` is None). ``absent_ms``: how long its
    node has been missing from the registry."""

    def move(state: str, reason: str, drain: bool = False, **changes) -> InstanceRecord:
        moved = record.moved(state, now, reason, **changes)
        result.moves.append(Move(moved, drain))
        return moved

    age = now - record.state_since_ms
    if record.state == REQUESTED:
        if record.provider_id:  # launched but the write of 'starting' was lost
            return move(STARTING, "launched")
        if age >= REQUEST_TIMEOUT_MS:
            return move(FAILED, "the provider never confirmed the launch", failure="launch not confirmed")
        return record
    if group is None and record.state in (STARTING, INSERVICE):
        return move(DRAINING, "its node group was deleted", drain=True,
                    drain_deadline_ms=now + _drain_ms(None))  # no group: the default drain timeout
    if group is not None and record.role not in group.regions.get(record.region, {}) \
            and record.state in (STARTING, INSERVICE):  # a PUT removed its region or role: no pool owns it
        return move(DRAINING, f"its pool {record.region}/{record.role} was removed from the node group",
                    drain=True, drain_deadline_ms=now + _drain_ms(group))
    if unreadable and record.state in (STARTING, INSERVICE, DRAINING):
        # Its agent is registered (its session's znode is there) but writes a record this build cannot
        # decode: a newer agent during a rolling upgrade, or a damaged write. Taken for a node that
        # died, a healthy node and its live streams were destroyed at once, and replaced.
        if record.state == STARTING:
            return move(INSERVICE, "registered (its record is not readable by this controller)",
                        registered_ms=now)
        if record.state == DRAINING and now >= record.drain_deadline_ms:
            return move(TERMINATING, "drain deadline passed")
        return record
    if record.state == STARTING:
        if node is not None:
            if node.state == STATE_DRAINING:
                return move(DRAINING, "sunset by an operator", drain_deadline_ms=now + _drain_ms(group),
                            registered_ms=now)
            return move(INSERVICE, "registered", registered_ms=now)
        if age >= group.policy.boot_timeout_s * 1000:
            return move(FAILED, f"did not register within {group.policy.boot_timeout_s:g} s",
                        failure="boot timeout")
        return record
    if record.state == INSERVICE:
        if node is None:
            if absent_ms < grace_ms:
                return record  # it may be registering again on a new session
            return move(FAILED, f"its registration vanished {absent_ms / 1000:.0f} s ago (node died)",
                        failure="node died")
        if node.state == STATE_DRAINING:
            return move(DRAINING, "sunset by an operator", drain_deadline_ms=now + _drain_ms(group))
        return record
    if record.state == DRAINING:
        if node is None:
            # a draining node still has its publishers or viewers (it ends when empty): one whose session a
            # ZooKeeper outage expired is registering again on a new one, like an in-service node, and was
            # destroyed with its live streams in the step that found it missing
            if absent_ms < grace_ms and now < record.drain_deadline_ms:
                return record
            return move(TERMINATING, "drained: its node left")
        if node.used == 0 and node.state == STATE_DRAINING:
            return move(TERMINATING, "drained: empty")
        if now >= record.drain_deadline_ms:
            return move(TERMINATING, "drain deadline passed")
        if node.state != STATE_DRAINING:  # lookups still choose it: ask its agent again
            result.drains.append(record)
        return record
    if record.state in (TERMINATING, FAILED) and not record.provider_id:
        return move(GONE, record.reason or "never launched")
    if record.state == GONE:
        window_ms = group.policy.failure_window_s * 1000 if group is not None else 0
        cool_down_ms = group.policy.cool_down_s * 1000 if group is not None else 0
        keep_ms = max(GONE_KEPT_MS, window_ms if record.failure else 0,
                      cool_down_ms if record.drain_deadline_ms else 0)  # a drain counts for the cool-down
        if age >= keep_ms:
            result.forgets.append(Forget(record.id))
        return record
    return record


def _destroy_due(now: int, before: InstanceRecord, after: InstanceRecord) -> bool:
    """An instance in terminating or failed is destroyed when it enters that state, and retried every
    TERMINATE_RETRY_MS while the provider has not confirmed (the controller rewrites the record's
    ``state_since_ms`` after each failed attempt)."""
    if after.state not in (TERMINATING, FAILED) or not after.provider_id:
        return False
    if after is not before or not after.reason.startswith(DESTROY_FAILED):
        return True  # just moved here (by us or an operator), or never attempted
    return now - after.state_since_ms >= TERMINATE_RETRY_MS


def _drain_ms(group: NodeGroup | None) -> int:
    policy = group.policy if group is not None else ScalePolicy()
    return int(policy.drain_timeout_s * 1000)


def _failure_budget_spent(now: int, group: NodeGroup, records: Iterable[InstanceRecord]) -> set[str]:
    window_ms = group.policy.failure_window_s * 1000
    counts: dict[str, int] = {}
    for record in records:
        # from when it failed (its record has been failed or gone since), not from its launch: a node that
        # failed at a boot timeout as long as the window never counted, and a broken image launched forever
        if record.group == group.name and record.failure and now - record.state_since_ms < window_ms:
            counts[record.region] = counts.get(record.region, 0) + 1
    return {region for region, n in counts.items() if n >= group.policy.failure_budget}


# -- scaling -----------------------------------------------------------------------------------------
def _scale_pool(now: int, group: NodeGroup, region: str, role: str, limits: PoolLimits,
                members: list[InstanceRecord], unmanaged: list[NodeRecord], nodes: Mapping[str, NodeRecord],
                due: bool, budget_spent: bool, result: Plan) -> None:
    policy = group.policy
    active = [r for r in members if r.state in ACTIVE]
    booting = [r for r in active if r.state in (REQUESTED, STARTING)]
    serving = [(r, nodes[r.id]) for r in active if r.state == INSERVICE and r.id in nodes]
    serving_nodes = [n for _, n in serving] + [n for n in unmanaged if n.state == STATE_INSERVICE]
    used = sum(n.used for n in serving_nodes)
    capacity = sum(n.capacity for n in serving_nodes) + len(booting) * group.launch.capacity[role]
    status = PoolStatus(group.name, region, role, len(active), len(serving),
                        sum(1 for r in members if r.state == DRAINING), used, capacity)
    result.pools.append(status)

    def hold(reason: str) -> None:
        result.holds.append(Hold(group.name, region, role, reason))

    def launch(count: int, reason: str) -> None:
        if budget_spent:
            hold(f"{reason}, but scaling is paused: {policy.failure_budget} failed launches in "
                 f"{policy.failure_window_s:g} s")
            return
        for _ in range(count):
            result.launches.append(Launch(group.name, region, role, reason))

    if len(active) < limits.min:  # the floor holds at any time, whatever the timers say
        launch(limits.min - len(active), f"below min {limits.min}")
        return
    if len(active) > limits.max:
        _remove(now, group, len(active) - limits.max, active, nodes, f"above max {limits.max}", result)
        return
    if not due:
        return
    utilization = status.utilization
    if utilization >= policy.scale_out_at:
        # a draining node still runs (and is paid for): growing past it put max + 1 nodes in the pool
        running = len(active) + status.draining
        if running >= limits.max:
            hold(f"load {utilization:.2f} >= {policy.scale_out_at:g} but at max {limits.max}"
                 + (f" ({status.draining} draining)" if status.draining else ""))
            return
        if booting:
            hold(f"load {utilization:.2f} >= {policy.scale_out_at:g}: waiting for {len(booting)} node(s) "
                 "to start")
            return
        warm_until = max((r.registered_ms for r in active), default=0) + policy.warm_up_s * 1000
        if now < warm_until:
            hold(f"load {utilization:.2f} >= {policy.scale_out_at:g}: warming up a new node")
            return
        launch(min(limits.increment, limits.max - running),
               f"load {utilization:.2f} >= {policy.scale_out_at:g}")
        return
    if utilization < policy.scale_in_below and len(active) > limits.min:
        if booting:
            return
        # a drained node that is gone already still counts: its drain ended when it went (an empty node
        # goes in a second or two, and the next drain followed at once, whatever coolDownS said)
        last_action = max([r.created_ms for r in members]
                          + [r.state_since_ms for r in members if r.state in (DRAINING, TERMINATING)
                             or (r.state == GONE and r.drain_deadline_ms)],
                          default=0)
        if now - last_action < policy.cool_down_s * 1000:
            hold(f"load {utilization:.2f} < {policy.scale_in_below:g}: cooling down")
            return
        if not serving:
            return
        record, node = min(serving, key=lambda pair: (pair[1].used, pair[1].started_ms))
        remaining = capacity - node.capacity
        if remaining <= 0:  # min 0: a pool without nodes measures no load, so it could never grow again
            hold(f"load {utilization:.2f} < {policy.scale_in_below:g}, but {record.id} is the pool's last "
                 "serving node: a pool without nodes has no load to grow on (raise min to add nodes, "
                 "lower max to remove it)")
            return
        if used / remaining >= policy.scale_out_at:
            hold(f"load {utilization:.2f} < {policy.scale_in_below:g}, but removing {record.id} would "
                 f"push the pool to its scale-out threshold")
            return
        result.moves.append(Move(record.moved(DRAINING, now, f"scale in: load {utilization:.2f} < "
                                                             f"{policy.scale_in_below:g}",
                                              drain_deadline_ms=now + _drain_ms(group)), drain=True))


def _remove(now: int, group: NodeGroup, count: int, active: list[InstanceRecord],
            nodes: Mapping[str, NodeRecord], reason: str, result: Plan) -> None:
    """Shrink a pool above its max: nodes still booting go first, then the least loaded drain."""

    def load(record: InstanceRecord) -> tuple[int, int]:
        node = nodes.get(record.id)
        return (0 if record.state != INSERVICE else 1, node.used if node is not None else 0)

    for record in sorted(active, key=load)[:count]:
        if record.state == INSERVICE:
            result.moves.append(Move(record.moved(DRAINING, now, reason,
                                                  drain_deadline_ms=now + _drain_ms(group)), drain=True))
        elif record.provider_id:
            moved = record.moved(TERMINATING, now, reason)
            result.moves.append(Move(moved))
            result.destroys.append(Destroy(moved))
        else:  # a launch a dead leader left unconfirmed; the orphan sweep removes any instance it made
            result.moves.append(Move(record.moved(GONE, now, reason)))


def pool_of(record: InstanceRecord) -> tuple[str, str, str]:
    return (record.group, record.region, record.role)


__all__ = ["Destroy", "Forget", "Hold", "Launch", "Move", "Plan", "PoolStatus", "plan", "STATE_INSERVICE"]
