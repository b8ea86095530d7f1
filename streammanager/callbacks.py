"""Delivery of the durable callback queue to ``EVENT_CALLBACK_URL`` (a controller leader duty).

Contract:
- Events are delivered per channel in queue (znode sequence) order. An event is deleted only after the
  application answered 200; any other answer, no answer within the timeout, or a connection error
  leaves it at the head of its channel, retried after a back-off (0.5 s doubling to 30 s by default)
  that belongs to that channel alone. Channels are delivered concurrently by a small pool, so a failing
  or slow application endpoint for one channel never holds back the others; within a channel nothing
  is ever reordered.
- Delivery is at least once: a dispatcher that dies between the 200 and the delete, or a leader that
  loses ZooKeeper in the middle of a POST, leads to the same event being sent again (with the same
  headers). Nothing is lost by a restart or a fail-over: the queue lives in ZooKeeper and the next
  leader starts from its head.
- Without ``EVENT_CALLBACK_URL`` events are consumed and none is sent.
- The reaper: an open publish session whose origin agent is gone (its node record absent, or the record
  of a restarted agent) for ``orphan_grace_s`` gets its stream-closed queued, so that a crashed origin
  still closes its sessions.

``run(stop)`` loops until ``stop`` is set and is meant to run only while its process leads;
``run_once(now)`` is one pass, for tests.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import requests
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError, NotEmptyError
from kazoo.recipe.watchers import ChildrenWatch
from prometheus_client import Counter, Gauge

from streammanager.coordinator_config import EventCallbackSettings
from streammanager.deadline import post_within, watched_session
from streammanager.events import CallbackEvent, EventQueue, OpenSession
from streammanager.models import NodeRecord, RecordError, StreamKey, StreamRecord
from streammanager.registry import ZkPaths

log = logging.getLogger(__name__)

DELIVERIES = Counter("sm_callback_deliveries_total", "Event callback POSTs by outcome: delivered (200), "
                     "refused (another status), unanswered (no answer, a connection error)", ["outcome"])
BLOCKED_CHANNELS = Gauge("sm_callback_blocked_channels",
                         "Channels whose next event the application has not accepted yet (retrying)")
BLOCKED_SECONDS = Gauge("sm_callback_blocked_seconds",
                        "How long the longest-blocked channel has been retrying its next event")

POLL_INTERVAL_S = 1.0  # a pass at least this often, besides the queue's watch
REAPED_KEEP_S = 24 * 3600  # a reaped session's tombstone waits this long for its origin to come back
TOMBSTONE_SWEEP_S = 60.0  # how often tombstones older than that are looked for
DELIVERED_MEMORY = 256  # event ids remembered per channel, to skip a copy queued by a retried create


@dataclass
class _ChannelState:
    next_at: float = 0.0  # monotonic time of the next attempt
    backoff_s: float = 0.0
    failures: int = 0
    failing_since: float = 0.0  # monotonic time of the first failed attempt at the head event (0: none)
    delivered: collections.deque = field(default_factory=lambda: collections.deque(maxlen=DELIVERED_MEMORY))


UNREADABLE_NODE = object()  # a registered node whose record does not decode (see _node_starts)


class CallbackDispatcher:
    name = "callbacks"

    def __init__(self, client: KazooClient, paths: ZkPaths, settings: EventCallbackSettings, *,
                 workers: int = 8, reap_interval_s: float = 5.0, orphan_grace_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self._client = client
        self._paths = paths
        self._settings = settings
        self._target = settings.target
        self._queue = EventQueue(client, paths)
        self._clock = clock
        self._workers = workers
        self._reap_interval_s = reap_interval_s
        self._orphan_grace_s = orphan_grace_s
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._channels: dict[str, _ChannelState] = {}
        self._inflight: set[str] = set()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._http = threading.local()
        self._next_reap = 0.0
        self._next_tombstone_sweep = 0.0
        self._orphans: dict[str, float] = {}  # session znode -> when first seen orphaned
        self.sent = 0  # successful deliveries (200)
        self.failed = 0  # failed attempts

    # -- the duty ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; then wait for the POSTs in flight (bounded by the timeout)."""
        self._stopping.clear()
        running = threading.Event()
        running.set()

        def on_stop() -> None:  # at once: a delivery under way must not post another event once told to stop
            stop.wait()
            self._stopping.set()
            self._wake.set()
        threading.Thread(target=on_stop, name="callbacks-stop", daemon=True).start()

        def on_channels(children: list[str]) -> bool:  # a new channel: deliver at once
            if not running.is_set():
                return False  # ends this watch
            self._wake.set()
            return True

        while not stop.is_set():
            try:
                self._client.retry(self._client.ensure_path, self._paths.callback_queue)
                ChildrenWatch(self._client, self._paths.callback_queue, on_channels)
                break
            except Exception as exc:  # ZooKeeper away: a pass at a time, until it is back
                log.warning("callback dispatcher cannot watch the queue yet: %s", exc)
                stop.wait(POLL_INTERVAL_S)
        log.info("callback dispatcher running (%s)",
                 "to the application" if self._target.enabled else "EVENT_CALLBACK_URL unset: consuming events")
        try:
            while not stop.is_set():
                delay = POLL_INTERVAL_S
                try:
                    delay = self.run_once(self._clock())
                except Exception as exc:  # ZooKeeper away: keep trying
                    log.warning("callback dispatch pass failed: %s", exc)
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            running.clear()
            self._stopping.set()
            self.close()
            BLOCKED_CHANNELS.set(0)  # a controller that does not lead delivers nothing: another one says
            BLOCKED_SECONDS.set(0)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no channel delivery is in flight (tests)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def run_once(self, now: float) -> float:
        """One pass: start delivering every channel whose retry time has come and that is not being
        delivered already, and reap orphaned sessions when due. Returns how long to wait for the next
        pass (at most POLL_INTERVAL_S)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="callbacks")
        try:
            channels = self._client.retry(self._client.get_children, self._paths.callback_queue)
        except NoNodeError:
            channels = []
        next_due = now + POLL_INTERVAL_S
        with self._lock:
            for gone in set(self._channels) - set(channels) - self._inflight:
                del self._channels[gone]
            for name in channels:
                state = self._channels.setdefault(name, _ChannelState())
                if name in self._inflight:
                    continue
                if state.next_at > now:
                    next_due = min(next_due, state.next_at)
                    continue
                self._inflight.add(name)
                self._pool.submit(self._deliver_channel, name)
            blocked = [state.failing_since for state in self._channels.values() if state.failures]
        # a refused event is retried for as long as it takes (the contract): an application that answers
        # one event 4xx for good holds its channel, which the operator sees here, besides the log
        BLOCKED_CHANNELS.set(len(blocked))
        BLOCKED_SECONDS.set(round(now - min(blocked), 1) if blocked else 0)
        if now >= self._next_reap:
            self._next_reap = now + self._reap_interval_s
            try:
                self.reap(now)
            except (KazooException, self._client.handler.timeout_exception) as exc:
                log.warning("session reaper pass failed: %s", exc)
        return max(0.0, min(next_due - now, POLL_INTERVAL_S))

    # -- one channel ---------------------------------------------------------------------------------
    def _deliver_channel(self, name: str) -> None:
        try:
            self._deliver_channel_inner(name)
        except Exception as exc:
            log.warning("delivery of channel %s interrupted: %s", ZkPaths.decode(name), exc)
            with self._lock:
                state = self._channels.setdefault(name, _ChannelState())
                state.next_at = self._clock() + max(state.backoff_s, self._settings.retry_initial_s)
        finally:
            with self._idle:
                self._inflight.discard(name)
                self._idle.notify_all()
            self._wake.set()

    def _deliver_channel_inner(self, name: str) -> None:
        parent = f"{self._paths.callback_queue}/{name}"
        with self._lock:
            state = self._channels.setdefault(name, _ChannelState())
        while not self._stopping.is_set():
            try:
                children = sorted(self._client.retry(self._client.get_children, parent))
            except NoNodeError:
                return
            if not children:
                try:  # an empty channel goes: its next event recreates it and wakes the queue's watch
                    self._client.retry(self._client.delete, parent)
                    return
                except NoNodeError:
                    return
                except NotEmptyError:
                    continue  # an event arrived meanwhile
            for child in children:
                if self._stopping.is_set() or not self._client.connected:
                    return
                path = f"{parent}/{child}"
                try:
                    data, _ = self._client.retry(self._client.get, path)
                except NoNodeError:
                    continue
                try:
                    event = CallbackEvent.from_json(data)
                except RecordError as exc:
                    log.error("dropping an undecodable queued event %s: %s", path, exc)
                    self._delete(path)
                    continue
                if event.event_id and event.event_id in state.delivered:
                    self._delete(path)  # a copy from a retried create: already delivered
                    continue
                if self._stopping.is_set():  # told to stop while reading it (held through an outage): the
                    return  # next leader delivers it; posting it here as well sent it twice
                if self._target.enabled and not self._post(event, state):
                    return
                if event.event_id:
                    state.delivered.append(event.event_id)
                self._delete(path)

    def _post(self, event: CallbackEvent, state: _ChannelState) -> bool:
        extra = {"action": event.event_type, "stream": event.channel}
        try:
            # within the timeout as a whole: an endpoint trickling its answer held the channel's thread
            response = post_within(self._session(), self._target.url, self._target.timeout_s, data=b"",
                                   allow_redirects=False, headers=self._target.headers(**event.headers()),
                                   auth=self._target.requests_auth())
            status: int | str = response.status_code
            response.close()
        except requests.RequestException as exc:
            status = type(exc).__name__
        outcome = "delivered" if status == 200 else "refused" if isinstance(status, int) else "unanswered"
        DELIVERIES.labels(outcome).inc()
        if status == 200:
            with self._lock:
                state.backoff_s, state.failures, state.next_at, state.failing_since = 0.0, 0, 0.0, 0.0
                self.sent += 1
            log.info("event %s delivered for session %s", " ".join(filter(None, (event.event_type, event.stream_type))),
                     event.session_id, extra=extra)
            return True
        with self._lock:
            if not state.failures:
                state.failing_since = self._clock()
            state.failures += 1
            self.failed += 1
            state.backoff_s = (self._settings.retry_initial_s if state.backoff_s == 0
                               else min(state.backoff_s * 2, self._settings.retry_max_s))
            state.next_at = self._clock() + state.backoff_s
            log.warning("event %s for session %s not accepted (%s): retry %d in %.1f s", event.event_type,
                        event.session_id, status, state.failures, state.backoff_s, extra=extra)
        return False

    def _delete(self, path: str) -> None:
        try:
            self._client.retry(self._client.delete, path)
        except NoNodeError:
            pass

    def _session(self) -> requests.Session:
        session = getattr(self._http, "session", None)
        if session is None:
            session = self._http.session = watched_session()
        return session

    # -- the reaper ----------------------------------------------------------------------------------
    def reap(self, now: float) -> int:
        """Queue stream-closed for every open session whose origin agent has been gone for
        ``orphan_grace_s``; returns how many it closed."""
        try:
            names = self._client.retry(self._client.get_children, self._paths.callback_sessions)
        except NoNodeError:
            self._orphans.clear()
            return 0
        reads = {n: self._client.get_async(f"{self._paths.callback_sessions}/{n}") for n in names}
        sessions: dict[str, OpenSession] = {}
        for name, pending in reads.items():
            try:
                sessions[name] = OpenSession.from_json(pending.get(timeout=5)[0])
            except NoNodeError:
                continue
            except RecordError as exc:
                log.error("removing an undecodable open session %s: %s", name, exc)
                self._delete(f"{self._paths.callback_sessions}/{name}")
        node_starts = self._node_starts({s.node_id for s in sessions.values()})
        closed = 0
        for name in list(self._orphans):
            if name not in sessions:
                del self._orphans[name]
        for name, session in sessions.items():
            start = node_starts.get(session.node_id)
            if start is UNREADABLE_NODE or start == session.node_started_ms or self._still_claimed(session):
                self._orphans.pop(name, None)
                continue
            since = self._orphans.setdefault(name, now)
            if now - since < self._orphan_grace_s:
                continue
            log.warning("origin %s of session %s is gone: queueing its stream-closed", session.node_id,
                        session.session_id, extra={"stream": session.channel, "node_id": session.node_id})
            self._queue.enqueue(CallbackEvent.closed(session.channel, session.session_id, session.node_id))
            self._queue.reap_session(session.channel, session.session_id)
            self._orphans.pop(name, None)
            closed += 1
        if closed:
            self._wake.set()
        if now >= self._next_tombstone_sweep:
            self._next_tombstone_sweep = now + TOMBSTONE_SWEEP_S
            self._forget_old_tombstones()
        return closed

    def _forget_old_tombstones(self) -> None:
        """Delete the tombstones of reaped sessions whose origin has not come back for REAPED_KEEP_S."""
        try:
            names = self._client.retry(self._client.get_children, self._paths.callback_reaped)
        except NoNodeError:
            return
        oldest_ms = (time.time() - REAPED_KEEP_S) * 1000
        stats = [(name, self._client.exists_async(f"{self._paths.callback_reaped}/{name}")) for name in names]
        for name, pending in stats:
            stat = pending.get(timeout=5)
            if stat is not None and stat.ctime < oldest_ms:
                self._delete(f"{self._paths.callback_reaped}/{name}")

    def _node_starts(self, node_ids: set[str]) -> dict[str, int | object]:
        """When each registered node's agent started; UNREADABLE_NODE for a node registered with a record
        this build cannot decode (another version's agent during an upgrade): its sessions are not
        orphans. Taken for a node that is gone, a newer origin's live sessions got stream-closed sent and
        were reaped (their claims, of the newer schema, did not decode either)."""
        reads = {n: self._client.get_async(self._paths.node(n)) for n in node_ids}
        starts: dict[str, int | object] = {}
        for node_id, pending in reads.items():
            try:
                data = pending.get(timeout=5)[0]
            except NoNodeError:
                continue
            try:
                starts[node_id] = NodeRecord.from_json(data).started_ms
            except RecordError:
                starts[node_id] = UNREADABLE_NODE
        return starts

    def _still_claimed(self, session: OpenSession) -> bool:
        try:
            data, _ = self._client.retry(self._client.get, self._paths.stream(StreamKey.parse(session.channel)))
            return StreamRecord.from_json(data).session_id == session.session_id
        except (NoNodeError, RecordError):
            return False
