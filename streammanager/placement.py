"""Answering broadcast and subscribe lookups from the registry view.

The one ZooKeeper call on this path is the reservation write for a stream that is not live yet, so
that concurrent broadcast lookups on different API servers answer the same origin.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from functools import partial
from typing import Mapping, NamedTuple

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError, NotEmptyError

from streammanager import regions
from streammanager.errors import BadRequest, NoCapacity, NotFound
from streammanager.logs import Throttle, held_back
from streammanager.models import (
    ROLE_EDGE,
    ROLE_ORIGIN,
    STATE_INSERVICE,
    NodeRecord,
    RecordError,
    Reservation,
    StreamKey,
)
from streammanager.registry import RegistryView, ZkPaths, now_ms
from streammanager.selection import LookupRequest, select

log = logging.getLogger(__name__)

RESERVATION_WRITE_TIMEOUT_S = 1.0
REFUSAL_LOG_INTERVAL_S = 10.0  # a lookup no node could take is logged at most this often per (role, region)


class Answer(NamedTuple):
    """A lookup's answer (a tuple: one is built per lookup)."""

    key: StreamKey
    node: NodeRecord

    def to_json(self) -> dict:
        return {
            "name": self.key.name,
            "scope": self.key.scope_path,
            "serverAddress": self.node.host,
            "region": self.node.region,
            "rtmpUrl": rtmp_url(self.node, self.key),
        }


def rtmp_url(node: NodeRecord, key: StreamKey) -> str:
    port = "" if node.rtmp_port == 1935 else f":{node.rtmp_port}"
    return f"rtmp://{node.host}{port}/{key.scope}/{key.name}"


class Assignments:
    """Answers given by this process that load reports may not show yet, per node.

    Each answer counts against its node for ``ttl_ms`` (and at most two ``BUCKET_MS`` more): long enough
    for the client to connect and the node's next report to include it. Answers are kept in buckets of
    ``BUCKET_MS`` (node -> answers), so forgetting old answers costs one step per node and bucket
    answered, not a walk over every node ten times a second.
    """

    BUCKET_MS = 100

    def __init__(self, ttl_ms: int):
        self._ttl_ms = ttl_ms
        self._buckets: deque[tuple[int, dict[str, int]]] = deque()  # (first answer's ms, node -> answers)
        self._counts: dict[str, int] = {}  # node -> answers in all buckets
        self._lock = threading.Lock()
        self._next_prune_ms = 0

    def add(self, node_id: str, now: int) -> None:
        with self._lock:
            buckets = self._buckets
            if not buckets or now >= buckets[-1][0] + self.BUCKET_MS:
                buckets.append((now, {}))
            bucket = buckets[-1][1]
            bucket[node_id] = bucket.get(node_id, 0) + 1
            counts = self._counts
            counts[node_id] = counts.get(node_id, 0) + 1

    def snapshot(self, now: int) -> Mapping[str, int]:
        """Node -> answers not yet expired. The mapping is live: read it with ``get``, do not iterate."""
        if now >= self._next_prune_ms:
            self._prune(now)
        return self._counts

    def _prune(self, now: int) -> None:
        with self._lock:
            self._next_prune_ms = now + self.BUCKET_MS
            buckets, counts = self._buckets, self._counts
            # a bucket goes when its last possible answer is older than the ttl
            while buckets and buckets[0][0] + self.BUCKET_MS <= now - self._ttl_ms:
                for node_id, answers in buckets.popleft()[1].items():
                    left = counts[node_id] - answers
                    if left:
                        counts[node_id] = left
                    else:
                        del counts[node_id]


def _check_strict(key: StreamKey, origin: NodeRecord, region: str | None, strict: bool, what: str) -> None:
    """A stream's one origin answers every broadcast lookup; ``strict=true`` refuses it when it is elsewhere."""
    if strict and region is not None and origin.region != region:
        raise BadRequest(f"stream {key.scope_path}/{key.name} {what} on an origin in region {origin.region}, "
                         f"not in {region[:64]} (strict)")


class Placement:
    def __init__(self, view: RegistryView, client: KazooClient, paths: ZkPaths, *,
                 heartbeat_max_age_s: float = 180.0, reservation_ttl_s: float = 30.0,
                 assignment_ttl_s: float = 3.0, best_few: int = 2, rng: random.Random | None = None):
        self.view = view
        self._client = client
        self._paths = paths
        self._max_age_ms = int(heartbeat_max_age_s * 1000)
        self._reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self._best_few = best_few
        self._rng = rng or random.Random()
        self.assignments = Assignments(int(assignment_ttl_s * 1000))
        self._own_reservations: dict[str, int] = {}  # path -> expires_ms, for housekeeping
        self._own_lock = threading.Lock()
        self._refusals: dict[tuple[str, str | None], Throttle] = {}  # (role, region) -> its log line's
        self._refusals_lock = threading.Lock()
        self._candidates_in = {role: partial(view.candidates, role) for role in (ROLE_ORIGIN, ROLE_EDGE)}

    # -- lookups ---------------------------------------------------------------------------------
    def broadcast(self, key: StreamKey, region: str | None, strict: bool) -> Answer:
        self._check_region(region)
        skey = str(key)
        origin = self.view.origin_of(skey)
        if origin is not None:  # live already: the broadcaster reconnects to its origin
            _check_strict(key, origin, region, strict, "is live")
            return Answer(key, origin)
        now = now_ms()
        try:
            chosen = self._select(ROLE_ORIGIN, key, skey, region, strict, None, None, now)
        except NoCapacity:
            # Every origin looks full, counting the answers given meanwhile: but a stream another lookup
            # reserved already holds its place there (a retrying encoder, a second lookup of the same
            # stream); it is answered its reservation, not refused.
            reserved = self._reserved_origin(key, now)
            if reserved is None:
                raise
            _check_strict(key, reserved, region, strict, "is reserved")
            return Answer(key, reserved)
        node, new_answer = self._reserve(key, chosen, now)
        if not new_answer:  # another lookup's reservation: every encoder of the stream goes there
            _check_strict(key, node, region, strict, "is reserved")
        else:  # counted once per stream, by the lookup that reserved it, not once per repeated lookup
            self.assignments.add(node.id, now)
        return Answer(key, node)

    def subscribe(self, key: StreamKey, region: str | None, strict: bool) -> Answer:
        self._check_region(region)
        skey = str(key)
        origin = self.view.origin_of(skey)
        if origin is None:
            raise NotFound(f"stream {key.scope_path}/{key.name} is not live")
        now = now_ms()
        chosen = self._select(ROLE_EDGE, key, skey, region, strict, origin.group, origin.region, now)
        self.assignments.add(chosen.id, now)
        return Answer(key, chosen)

    def _check_region(self, region: str | None) -> None:
        if region is not None and not regions.is_known(region) and region not in self.view.all_regions():
            raise BadRequest(f"unknown region {region[:64]!r}: not a known AWS or GCE region "
                             "and no node runs there")

    def _select(self, role, key, skey, region, strict, group, near_region, now) -> NodeRecord:
        # positional arguments: a NamedTuple built from keywords costs twice as much, on every lookup
        req = LookupRequest(role, skey, region, strict, near_region, group, now, self._max_age_ms,
                            self.assignments.snapshot(now))
        view = self.view
        preferred = view.carriers(skey, role) if role == ROLE_EDGE else ()
        result = select(req, self._candidates_in[role], view.regions(role), self._rng,
                        best_few=self._best_few, preferred=preferred)
        if result.node is None:
            self._log_refusal(role, region, key, result.reason)
            raise NoCapacity(result.reason)
        return result.node

    def _log_refusal(self, role: str, region: str | None, key: StreamKey, reason: str) -> None:
        """Log a lookup no node could take, once per ``REFUSAL_LOG_INTERVAL_S`` per (role, region) with
        how many more were refused meanwhile: a line per lookup was thousands a second exactly when
        capacity ran out (``sm_lookups_total{outcome="no_capacity"}`` counts each one). Regions here
        are known ones (``_check_region``), so the table stays small."""
        with self._refusals_lock:
            throttle = self._refusals.setdefault((role, region), Throttle(REFUSAL_LOG_INTERVAL_S))
        held = throttle.allow()
        if held is not None:
            log.info("no node for lookup: %s%s", reason, held_back(held),
                     extra={"scope": key.scope, "stream": key.name, "role": role, "region": region})

    # -- reservations ----------------------------------------------------------------------------
    def _usable(self, node: NodeRecord | None, now: int) -> bool:
        return (node is not None and node.state == STATE_INSERVICE
                and node.updated_ms >= now - self._max_age_ms and node.used < node.capacity)

    def _reserved_origin(self, key: StreamKey, now: int) -> NodeRecord | None:
        """The origin of the stream's unexpired reservation, if it can still take it; else None."""
        if not self._client.connected:
            return None
        try:
            data, _ = self._client.get_async(self._paths.reservation(key)).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
            theirs = Reservation.from_json(data)
        except (NoNodeError, RecordError):
            return None
        except (KazooException, self._client.handler.timeout_exception, OSError) as exc:
            log.warning("reservation read failed (%s)", exc, extra={"scope": key.scope, "stream": key.name})
            return None
        node = self.view.node(theirs.node_id)
        return node if theirs.expires_ms > now and self._usable(node, now) else None

    def _reserve(self, key: StreamKey, chosen: NodeRecord, now: int) -> tuple[NodeRecord, bool]:
        """Record ``chosen`` as the stream's origin unless another lookup did first. Returns the origin
        every lookup for this stream must answer, and whether it is a new answer (this lookup reserved
        it, or answered without a reservation) rather than another lookup's reservation. Without
        ZooKeeper, answer ``chosen``."""
        if not self._client.connected:
            return chosen, True
        path = self._paths.reservation(key)
        mine = Reservation(chosen.id, now + self._reservation_ttl_ms)
        try:
            for _ in range(3):
                try:
                    # persistent, not ephemeral: a reload (SIGHUP) replaces every worker, and their
                    # sessions took their reservations with them (a stream looked up again before its
                    # encoder came got another origin); one expires, and goes (expire_reservations,
                    # sweep_expired) or is replaced by the next lookup
                    self._client.create_async(path, mine.to_json(), makepath=True
                                              ).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                    with self._own_lock:
                        self._own_reservations[path] = mine.expires_ms
                    return chosen, True
                except NodeExistsError:
                    pass
                except NoNodeError:  # its scope's znode was removed (emptied) between makepath's steps
                    continue
                try:
                    data, stat = self._client.get_async(path).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                except NoNodeError:
                    continue
                try:
                    theirs = Reservation.from_json(data)
                except RecordError:
                    theirs = None
                if theirs is not None and theirs.expires_ms > now:
                    node = self.view.node(theirs.node_id)
                    if self._usable(node, now):
                        return node, False
                try:  # expired, unreadable, or its node is gone: replace it
                    self._client.delete_async(path, version=stat.version).get(
                        timeout=RESERVATION_WRITE_TIMEOUT_S)
                except (NoNodeError, BadVersionError):
                    pass
        except (KazooException, self._client.handler.timeout_exception, OSError) as exc:
            log.warning("reservation write failed (%s): answering without one", exc,
                        extra={"scope": key.scope, "stream": key.name})
        return chosen, True

    def expire_reservations(self, now: int | None = None) -> int:
        """Delete this process's expired reservations; return how many went."""
        now = now if now is not None else now_ms()
        if not self._client.connected:
            # kept for when it is back: a call now would wait for the connection, and hold up the
            # housekeeper's other tasks (the lookup metrics' flush) for the whole outage
            return 0
        with self._own_lock:
            due = [p for p, exp in self._own_reservations.items() if exp <= now]
            for path in due:
                del self._own_reservations[path]
        removed = 0
        timeout = (KazooException, self._client.handler.timeout_exception)
        for path in due:
            try:
                data, stat = self._client.get_async(path).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                if Reservation.from_json(data).expires_ms <= now:
                    self._client.delete_async(path, version=stat.version).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                    removed += 1
            except (NoNodeError, BadVersionError, RecordError):
                pass
            except timeout as exc:
                log.warning("could not expire reservation %s: %s", path, exc or type(exc).__name__)
        # a reservation's scope znode is persistent (makepath): remove the ones left empty, or every
        # scope any client ever named in a broadcast lookup stays in ZooKeeper for good
        for scope in {path.rsplit("/", 1)[0] for path in due}:
            try:
                self._client.delete_async(scope).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
            except (NoNodeError, NotEmptyError):
                pass  # gone already, or other reservations (or one made meanwhile) still in it
            except timeout as exc:
                log.warning("could not remove the emptied reservation scope %s: %s", scope, exc or type(exc).__name__)
        return removed

    def sweep_expired(self, now: int | None = None) -> int:
        """Delete every reservation expired ``ORPHAN_GRACE_MS`` ago, whoever made it: its worker has
        gone (a reload, a restart, a crash) before it expired, and nobody looked the stream up again.
        Returns how many went."""
        now = now if now is not None else now_ms()
        if not self._client.connected:
            return 0
        timeout = (KazooException, self._client.handler.timeout_exception)
        removed = 0
        try:
            scopes = self._client.get_children_async(self._paths.reservations).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
        except NoNodeError:
            return 0
        except timeout as exc:
            log.warning("could not list the reservations: %s", exc or type(exc).__name__)
            return 0
        for scope in scopes:
            parent = f"{self._paths.reservations}/{scope}"
            try:
                names = self._client.get_children_async(parent).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                reads = [(f"{parent}/{n}", self._client.get_async(f"{parent}/{n}")) for n in names]
                for path, read in reads:
                    try:
                        data, stat = read.get(timeout=RESERVATION_WRITE_TIMEOUT_S)
                        expires_ms = Reservation.from_json(data).expires_ms
                    except NoNodeError:
                        continue
                    except RecordError:  # unreadable: as old as its last write says
                        expires_ms = stat.mtime + self._reservation_ttl_ms
                    if expires_ms <= now - ORPHAN_GRACE_MS:
                        try:
                            self._client.delete_async(path, version=stat.version).get(
                                timeout=RESERVATION_WRITE_TIMEOUT_S)
                            removed += 1
                        except (NoNodeError, BadVersionError):
                            pass
                self._client.delete_async(parent).get(timeout=RESERVATION_WRITE_TIMEOUT_S)
            except (NoNodeError, NotEmptyError):
                pass  # gone already, or still holds reservations
            except timeout as exc:
                log.warning("could not sweep the reservations of %s: %s", scope, exc or type(exc).__name__)
        if removed:
            log.info("removed %d expired reservations of workers that have gone", removed)
        return removed


ORPHAN_GRACE_MS = 5_000  # a reservation's own worker expires it within a second or two
ORPHAN_SWEEP_S = 60.0  # each worker sweeps everyone's expired reservations this often (plus up to as much)


class Housekeeper(threading.Thread):
    """Expires this process's reservations in the background, and runs the ``also`` tasks (the lookup
    metrics' flush) at the same pace; about once a minute, sweeps the expired reservations of workers
    that have gone (:meth:`Placement.sweep_expired`)."""

    def __init__(self, placement: Placement, interval_s: float = 1.0, also: tuple = ()):
        super().__init__(name="sm-housekeeper", daemon=True)
        self._placement = placement
        self._interval_s = interval_s
        self._tasks = (placement.expire_reservations, *also)
        self._stop_event = threading.Event()

    def run(self) -> None:
        # spread out: every worker of every server sweeps, not all at once
        next_sweep = time.monotonic() + ORPHAN_SWEEP_S * random.uniform(0.1, 1.0)
        while not self._stop_event.wait(self._interval_s):
            for task in self._tasks:
                try:
                    task()
                except Exception:
                    log.exception("housekeeping failed")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + ORPHAN_SWEEP_S * random.uniform(1.0, 2.0)
                try:
                    self._placement.sweep_expired()
                except Exception:
                    log.exception("sweeping expired reservations failed")

    def stop(self) -> None:
        self._stop_event.set()
