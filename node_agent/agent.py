"""The node agent: registers its media node in ZooKeeper, reports load, and decides on hooks.

Contract:
- The node record is an ephemeral znode of the agent's session, rewritten every report interval
  (a heartbeat) and soon after any change. If the session is lost, the next report registers the node
  again and claims every stream it still publishes, except the sessions that the controller's reaper
  closed meanwhile (their publishers are dropped: the application was told they ended).
- On an origin, a publish claims the stream's ephemeral znode (the one synchronous ZooKeeper write on a
  hook); a stream live anywhere else, or a second publisher here, is refused.
- ``stop()`` deregisters at once: stream claims and node record deleted, session closed.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError

from node_agent.artifacts import MediaLayout, sweep_live_hls
from node_agent.commands import CommandWatcher
from node_agent.config import AgentSettings
from node_agent.fencing import OriginFence
from node_agent.media import NginxConfig, NginxServer
from node_agent.metrics import AgentMetrics
from node_agent.relay import RelayKeys, RelayManager
from node_agent.sessions import SessionTracker
from node_agent.state import StreamTable
from node_agent.verification import KeyVerifier
from streammanager.models import (
    ROLE_EDGE,
    ROLE_ORIGIN,
    STATE_DRAINING,
    STATE_INSERVICE,
    STATE_STARTING,
    NodeRecord,
    RecordError,
    StreamKey,
    StreamRecord,
    validate_name,
)
from streammanager.commands import COMMAND_CLOSE, COMMAND_DRAIN
from streammanager.events import EventQueue
from streammanager.logs import Throttle
from streammanager.registry import (
    UNREADABLE_CLAIM,
    StreamClaims,
    ZkPaths,
    connect,
    ensure_layout,
    make_client,
    now_ms,
)
from streammanager.zookeeper import free_port

log = logging.getLogger(__name__)

NGINX_RELAY_FLASHVER = "ngx-local-relay"
PULL_PENDING_S = 5.0
LOOP_TICK_S = 2.0  # the report loop runs at least this often, written or not
CLOSE_WAIT_S = 3.0  # a close command waits this long for the dropped publisher's publish_done
REAPED_CHECK_S = 30.0  # after registering again, how long the reaper's tombstones are looked for
FINISH_ON_STOP_S = 10.0  # a stop with publishers on gives their sessions this long to make their VOD and events
RECORD_FULL_SHARE = 0.9  # from this share of --max-record-bytes on, the node takes no new stream
RECORD_ENTRY_BYTES = 40  # a stream's entry in the node record, beyond its quoted name: [subs, relays, pub, start_ms]
RECORD_TOO_LARGE_LOG_EVERY_S = 30.0
REGISTER_WAIT_S = 10.0  # at start, how long a record of another session of this node id is waited out (at least)



@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    message: str = "OK"
    location: str | None = None  # a 3xx answer's target (nginx-rtmp pulls an rtmp:// location)

    @classmethod
    def allow(cls) -> "Decision":
        return cls(True)

    @classmethod
    def refuse(cls, message: str, status: int = 403) -> "Decision":
        return cls(False, status, message)


NO_ROOM = object()  # Agent._let_in: the node record has no room for a new stream
_NO_ROOM_REFUSAL = Decision.refuse("node carries as many streams as its registry record can hold", 503)


class _UnderWay:
    """A publish hook under way; ``left`` when its publisher left (or its nginx died) meanwhile."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = False


class DuplicateNode(RuntimeError):
    """Another live agent holds this node id's record."""


class Agent:
    def __init__(self, settings: AgentSettings, client: KazooClient | None = None):
        self.settings = settings
        self.paths = ZkPaths(settings.zk_root)
        self.client = client or make_client(settings.zk_hosts, settings.zk_timeout_s, settings.zk_auth)
        self.claims = StreamClaims(self.client, self.paths)
        self.table = StreamTable()
        self.relay_keys = RelayKeys()  # an edge accepts a publisher only with one of these (our relays)
        self.registered = threading.Event()  # set once start() registered the node
        self._record_missing = False  # our node record was deleted while our session lives
        self._claims_to_check: set[str] = set()  # claim paths whose watch fired: claim again if still ours
        self._claims_lock = threading.Lock()
        self._live_nowhere_since: dict[str, float] = {}  # edge: stream -> since when no origin has it
        self._reaped_check_until = 0.0  # monotonic: look for reaped sessions with each report until then
        self._releases_owed: dict[StreamKey, str] = {}  # claims an unpublish could not release yet: key -> session
        self.last_progress = time.monotonic()  # when the report loop last ran
        self.state = STATE_INSERVICE
        self.started_ms = now_ms()
        self._registered_session: int | None = None
        self._last_content: tuple | None = None
        self.record_bytes = 0  # size of the last node record built
        self.metrics = AgentMetrics(self)
        self._too_large_log = Throttle(RECORD_TOO_LARGE_LOG_EVERY_S)
        self._full_log = Throttle(RECORD_TOO_LARGE_LOG_EVERY_S)
        self._last_write = 0.0
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        # streams let in since the last record was built, which that record's size does not count yet
        # (-> their estimated bytes in a record): without them, a burst of hooks all passed the check of
        # one record's size and the next record grew past --max-record-bytes, never to be written
        self._room_lock = threading.Lock()
        self._record_keys: frozenset[str] = frozenset()
        self._unreported: dict[str, int] = {}
        self._publishes_under_way: dict[tuple[str, str], list[_UnderWay]] = {}  # (stream, client) -> its hooks
        self._stop_begun = False
        self._reporter: threading.Thread | None = None
        self._log_extra = {"node_id": settings.node_id, "role": settings.role, "region": settings.region}
        self.media: NginxServer | None = None
        self.relays: RelayManager | None = None
        self._own_work_dir = False
        # absolute: nginx reads a relative -c path against its -p prefix (a relative --work-dir doubled)
        self.work_dir: Path | None = Path(settings.work_dir).resolve() if settings.work_dir else None
        self._reconciler: threading.Thread | None = None
        self._absent_once: set[tuple[str, str]] = set()
        self._pulls: dict[str, float] = {}  # stream -> when nginx was told to pull it
        self._pull_lock = threading.Lock()
        # the coordinator contract: key verification, events owed per publish session, commands
        self.verifier = KeyVerifier(settings.key_verification)
        self.media_layout: MediaLayout | None = None
        self.commands = CommandWatcher(self.client, self.paths, settings.node_id,
                                       {COMMAND_CLOSE: self._command_close, COMMAND_DRAIN: self._command_drain})
        if settings.media == "nginx":
            if self.work_dir is None:  # only a media server needs files
                self.work_dir = Path(tempfile.mkdtemp(prefix=f"node-agent-{settings.node_id}-"))
                self._own_work_dir = True
            if settings.role == ROLE_ORIGIN:  # origins write live HLS, recordings and previews there
                self.media_layout = MediaLayout(Path(settings.media_root or self.work_dir / "media").resolve())
            self.media = NginxServer(NginxConfig(
                work_dir=self.work_dir, host=settings.host, rtmp_port=settings.rtmp_port, stat_port=free_port(),
                hook_url=f"{settings.agent_url}/hooks/nginx", idle_streams=settings.role == ROLE_EDGE,
                media_root=self.media_layout.root if self.media_layout else None,
                hls_fragment_s=settings.hls_fragment_s, hls_playlist_s=settings.hls_playlist_s),
                on_exit=self._media_exited, on_serving=self._media_serving)
            if settings.role == ROLE_EDGE and settings.relay == "ffmpeg":
                self.relays = RelayManager(edge_host=settings.host, rtmp_port=settings.rtmp_port,
                                           node_id=settings.node_id, relay_keys=self.relay_keys,
                                           resolve_origin=self.origin_address,
                                           on_failure=OriginFence(self.client, self.paths,
                                                                  settings.node_id).relay_failed)
        self.sessions = SessionTracker(EventQueue(self.client, self.paths), settings.node_id, self.started_ms,
                                       layout=self.media_layout, preview_interval_s=settings.preview_interval_s)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, connect_timeout_s: float = 30.0, stop: threading.Event | None = None) -> bool:
        """Start the media server (if any), then register: True. False if ``stop`` is set while it waits
        for ZooKeeper. Raises MediaError or a kazoo error."""
        if self.media is not None:
            self.media.start()
            log.info("nginx serving RTMP on %s:%d", self.settings.host, self.settings.rtmp_port,
                     extra=self._log_extra)
        if self.relays is not None:
            self.relays.start()
        if not connect(self.client, connect_timeout_s, stop):
            return False
        ensure_layout(self.client, self.paths)
        self.report(force=True)
        # a record removed by someone else (a peer's fence, an operator) while this agent lives is
        # written again at once, not at the next heartbeat
        self.client.DataWatch(self.paths.node(self.settings.node_id), self._on_own_record)
        self.sessions.start()
        self.commands.start()
        self._reporter = threading.Thread(target=self._report_loop, name="agent-reporter", daemon=True)
        self._reporter.start()
        self.registered.set()
        if self.media is not None:
            self._reconciler = threading.Thread(target=self._reconcile_loop, name="agent-reconcile", daemon=True)
            self._reconciler.start()
        log.info("agent registered", extra=self._log_extra)
        return True

    def stop(self) -> None:
        """Deregister at once: closing the session makes ZooKeeper delete the node record and every
        stream claim in one step, and never blocks on an unreachable ZooKeeper. An origin first ends
        its publish sessions (:meth:`_finish_sessions`)."""
        with self._stop_lock:
            if self._stop_begun:
                return
            self._stop_begun = True
        self._finish_sessions(FINISH_ON_STOP_S)
        self._stopping.set()
        self._urgent.set()
        self._wake.set()
        if self._reporter is not None:
            self._reporter.join(5.0)
        self.commands.stop()
        self.sessions.stop()  # queues what is ready; open sessions are closed by the controller's reaper
        try:
            self.client.stop()
        finally:
            self.client.close()
        log.info("agent deregistered", extra=self._log_extra)
        if self.relays is not None:
            self.relays.stop_all()
        if self.media is not None:
            self.media.stop()
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _finish_sessions(self, timeout_s: float) -> None:
        """An origin stopped with publishers on: drain (lookups stop answering this node, and its hooks
        refuse a publisher that comes back), drop each publisher, and give their sessions up to
        ``timeout_s`` to end as a publisher's own stop ends them: nginx closes the recording, it becomes
        the session's VOD, and HLS-VOD then stream-closed are queued. The encoders reconnect elsewhere.
        Before, the recording was left in the media root, never made a VOD, and the controller's
        reaper sent stream-closed alone once the node had gone."""
        if self.settings.role != ROLE_ORIGIN or not self.client.connected:
            return
        published = self.table.published()
        if not published:
            return
        log.info("stopping: ending %d publish session(s) first", len(published), extra=self._log_extra)
        self.state = STATE_DRAINING
        self.changed(urgent=True)
        for stream in published:
            if self.media is not None:
                self.media.drop_publisher(stream.key.scope, stream.key.name)
            elif stream.publisher is not None:  # a simulated node: its publishers leave as they would
                self.on_publish_done(stream.key, stream.publisher)
        if not self.sessions.wait_finished(timeout_s):
            log.warning("stopping: sessions still open after %.0f s; the controller's reaper closes them",
                        timeout_s, extra=self._log_extra)

    # -- reporting -------------------------------------------------------------------------------
    def record(self) -> NodeRecord:
        s = self.settings
        state = self.state
        if state == STATE_INSERVICE and self.media is not None and not self.media.serving:
            state = STATE_STARTING  # nginx is down or hung: no lookup may send anyone here meanwhile
        return NodeRecord(
            id=s.node_id, group=s.group, region=s.region, role=s.role, host=s.advertise_host or s.host,
            rtmp_port=s.rtmp_port, agent_url=s.agent_url, capacity=s.capacity, state=state,
            streams=self.table.loads(), cpu=_cpu_load(), updated_ms=now_ms(), started_ms=self.started_ms,
            private_host=s.host if s.advertise_host and s.advertise_host != s.host else "",
        )

    def registered_on_current_session(self) -> bool:
        """Whether the node record was written by the client's current session (after a session
        expired, the record is gone until the next report registers it again)."""
        client_id = self.client.client_id
        return client_id is not None and client_id[0] == self._registered_session

    def report(self, force: bool = False) -> bool:
        """Write the node record if it changed, or if a heartbeat is due, or with ``force``; after a
        new session, register it again and reclaim streams; claim again streams whose claim someone
        removed (``DELETE /admin/event``). Returns whether it wrote the record. Skipped while
        disconnected: the session's return (or a new one) brings the next report."""
        if not self.client.connected:
            return False
        session = self.client.client_id[0] if self.client.client_id else None
        if self._claims_to_check and session == self._registered_session:
            self._check_claims()
        if self._releases_owed and session == self._registered_session:
            self._release_owed()
        self._forget_unreported(self._record_keys)  # let in, then refused or gone: no room taken
        record = self.record()
        content = (record.state, record.capacity, dict(record.streams), round(record.cpu, 1))
        heartbeat_due = time.monotonic() - self._last_write >= self.settings.heartbeat_interval_s
        missing, self._record_missing = self._record_missing, False
        if session == self._registered_session and content == self._last_content \
                and not (heartbeat_due or force or missing):
            return False
        data = record.to_json()
        with self._room_lock:
            self.record_bytes = len(data)
            self._record_keys = frozenset(record.streams)
        self._forget_unreported(self._record_keys)
        if len(data) > self.settings.max_record_bytes:
            self.metrics.report_failures.inc()
            # ZooKeeper would drop the connection (jute.maxbuffer) at every attempt, and with it every
            # claim and session write of this node's hooks: keep the last record written, and say why
            if self._too_large_log.allow() is not None:
                log.error("node record not written: %d bytes (%d streams) is over --max-record-bytes %d "
                          "(ZooKeeper's jute.maxbuffer): the node takes no new stream until it carries fewer",
                          len(data), len(record.streams), self.settings.max_record_bytes, extra=self._log_extra)
            return False
        path = self.paths.node(self.settings.node_id)
        if session != self._registered_session:
            self._register(path, data)
            self._back_after_absence()
            if self._registered_session is not None:  # the log said only "Session has expired" before
                log.info("agent registered again on a new ZooKeeper session", extra=self._log_extra)
            self._registered_session = session
        else:
            try:
                self.client.set(path, data)
            except NoNodeError:  # removed by someone else (a peer fenced us by mistake): back at once
                log.warning("node record was removed while this agent lives: registering again",
                            extra=self._log_extra)
                self._register(path, data)
                self._back_after_absence()
        if time.monotonic() < self._reaped_check_until:
            self._drop_reaped()
        self._last_content = content
        self._last_write = time.monotonic()
        return True

    def _register(self, path: str, data: bytes) -> None:
        """Create the node record. A record of another session is waited out at start (a restarted
        agent's previous session lingers up to its timeout), never deleted: if it outlives that wait, or
        appears later, another live agent has this node id (DuplicateNode); replacing its record made
        the two overwrite each other, and lookups answer the one that wrote last."""
        wait_s = 0.0 if self.registered.is_set() else max(REGISTER_WAIT_S, 2 * self.settings.zk_timeout_s + 1)
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            try:
                self.client.create(path, data, ephemeral=True, makepath=True)
                return
            except NodeExistsError:
                pass
            try:
                theirs, stat = self.client.get(path)
            except NoNodeError:
                continue
            if stat.ephemeralOwner == self.client.client_id[0]:
                self.client.set(path, data)
                return
            if time.monotonic() >= deadline:
                try:
                    where = NodeRecord.from_json(theirs).host
                except RecordError:
                    where = "unreadable record"
                raise DuplicateNode(f"node id {self.settings.node_id} is registered by another live agent "
                                    f"({where}): give each node its own --node-id")
            if not said:
                log.info("waiting for the record of an earlier session of this node id to expire",
                         extra=self._log_extra)
                said = True
            time.sleep(0.2)

    def _back_after_absence(self) -> None:
        """Registered again (a new session, or the record was removed): sessions that the reaper
        closed meanwhile end here, and every other stream published here is claimed again. The reaper
        may still act on what it read just before the record came back: its tombstones are looked for
        again with each report for REAPED_CHECK_S."""
        if self.settings.role == ROLE_ORIGIN:
            self._reaped_check_until = time.monotonic() + REAPED_CHECK_S
            self._drop_reaped()
        self._reclaim_streams()

    def _drop_reaped(self) -> None:
        """Drop the publishers of sessions that the controller's reaper closed while this node was away
        (frozen past its ZooKeeper session): the application has their stream-closed, and going on with
        the session sent it a second one at the end. The encoder reconnects as a new session."""
        try:
            reaped = set(self.sessions.forget_reaped())
        except Exception as exc:  # kazoo's errors and timeouts: the next report looks again
            log.warning("could not look for sessions closed while this node was away: %s", exc,
                        extra=self._log_extra)
            return
        for stream in self.table.published():
            if stream.session_id in reaped:
                log.warning("the controller closed this publish session while this node was away (its "
                            "stream-closed is sent): dropping its publisher here",
                            extra={**self._log_extra, "scope": stream.key.scope, "stream": stream.key.name})
                self._lose_stream(stream)

    def _reclaim_streams(self, only_paths: set[str] | None = None) -> None:
        """Claim every stream published here (an origin's: an edge's published streams are its relays,
        owned by their origin), or only those whose claim path is in ``only_paths``."""
        if self.settings.role != ROLE_ORIGIN:
            return
        for stream in self.table.published():
            path = self.paths.stream(stream.key)
            if only_paths is not None and path not in only_paths:
                continue
            record = StreamRecord(self.settings.node_id, stream.session_id or "", stream.start_ms)
            owner = self.claims.claim(stream.key, record)
            extra = {**self._log_extra, "scope": stream.key.scope, "stream": stream.key.name}
            if owner.session_id != record.session_id and owner.node_id == self.settings.node_id:
                owner = self._replace_stale_claim(stream.key, owner, record)
            if owner.session_id == record.session_id:
                self._watch_claim(path)
                if only_paths is not None:
                    log.info("the stream's claim was removed while it is published here (DELETE "
                             "/admin/event?): claimed it again", extra=extra)
            elif owner == UNREADABLE_CLAIM or owner.node_id == self.settings.node_id:
                # unreadable, or a stale claim of this node that could not be replaced just now
                log.warning("the stream's claim could not be settled: left alone, the stream stays published "
                            "here", extra=extra)
            else:
                # Another origin took the stream while this node was away (its session expired): the
                # claim decides. Publishing on here too would give the stream two origins, and lookups
                # the one that started first, whatever the claim says.
                log.warning("stream was claimed by %s while this node was away: dropping its publisher here",
                            owner.node_id, extra=extra)
                self._lose_stream(stream)

    def _release(self, key: StreamKey, session: str) -> None:
        """Release the claim of a publish that ended; if ZooKeeper does not answer, the reports try
        again (else the claim outlived the publish as long as this agent's session, refusing the
        stream's publishers on every other origin)."""
        try:
            self.claims.release(key, session)
        except KazooException as exc:
            log.warning("could not release the stream's claim (%s): trying again with the next reports", exc,
                        extra={**self._log_extra, "scope": key.scope, "stream": key.name})
            with self._claims_lock:
                self._releases_owed[key] = session
            self.changed()

    def _release_owed(self) -> None:
        with self._claims_lock:
            owed, self._releases_owed = self._releases_owed, {}
        for key, session in owed.items():
            self._release(key, session)  # owed again if it fails again; a claim of another session stays

    def _lose_stream(self, stream) -> None:
        """End a publish here whose stream belongs to another origin now: the encoder is dropped (it
        asks the stream manager again and is sent to the owner) and the stream leaves this node's record."""
        key = stream.key
        if self.media is not None:
            self.media.drop_publisher(key.scope, key.name)
        self.on_publish_done(key, stream.publisher or "")  # no-op if nginx's publish_done came first

    # Claims are watched: one removed by someone else while the stream is published here (an admin's
    # DELETE /admin/event clears every claim; the specification says publishing goes on) is claimed
    # again by the next report, woken at once. A claim released by an unpublish fires the watch too;
    # the stream is no longer published then, and nothing is claimed.
    def _watch_claim(self, path: str) -> None:
        watched = self.client.exists_async(path, watch=self._on_claim_event)
        watched.rawlink(lambda result: self._claim_watched(path, result))

    def _claim_watched(self, path: str, result) -> None:
        try:
            if result.get_nowait() is None:  # removed before the watch was set
                self._claim_lost(path)
        except Exception:  # the connection went: a new session reclaims every stream anyway
            pass

    def _on_claim_event(self, event) -> None:
        if event.path is not None:  # None: the session went; a new one reclaims every stream
            self._claim_lost(event.path)

    def _claim_lost(self, path: str) -> None:
        if not self._stopping.is_set():
            with self._claims_lock:
                self._claims_to_check.add(path)
            self.changed(urgent=True)

    def _check_claims(self) -> None:
        with self._claims_lock:
            paths, self._claims_to_check = self._claims_to_check, set()
        try:
            self._reclaim_streams(only_paths=paths)
        except BaseException:
            with self._claims_lock:
                self._claims_to_check |= paths  # the next report tries again
            raise

    def _on_own_record(self, data, stat, event=None) -> bool:
        if self._stopping.is_set():
            return False  # stop watching
        if data is None and event is not None:
            self._record_missing = True
            self.changed(urgent=True)
        return True

    def changed(self, urgent: bool = False) -> None:
        """Report soon. Load changes coalesce to one write per report interval; ``urgent`` ones (a
        stream appearing or leaving, which lookups depend on) are written at once."""
        if urgent:
            self._urgent.set()
        self._wake.set()

    def _report_loop(self) -> None:
        """Report soon after a change (at most one write per report interval) and at least every
        heartbeat interval. ``last_progress`` says when the loop last ran (the stall watchdog's input)."""
        tick_s = min(self.settings.heartbeat_interval_s, LOOP_TICK_S)
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            self._wake.wait(tick_s)
            if self._stopping.is_set():
                break
            self._wake.clear()
            self._urgent.clear()
            try:
                if self.report():
                    self._urgent.wait(self.settings.report_interval_s)
            except KazooException as exc:
                self.metrics.report_failures.inc()
                log.warning("load report failed: %s", exc, extra=self._log_extra)
            except DuplicateNode as exc:
                self.metrics.report_failures.inc()
                log.error("%s", exc, extra=self._log_extra)
            except Exception:
                self.metrics.report_failures.inc()
                log.exception("load report failed", extra=self._log_extra)

    # -- hook decisions --------------------------------------------------------------------------
    def _new_entry_bytes(self, key: StreamKey) -> int:
        """What ``key`` would add to the node record: 0 if the node carries it already (its last record,
        or since). With ``_room_lock`` held."""
        text = str(key)
        if text in self._record_keys or text in self._unreported or self.table.carries(key):
            return 0
        return len(orjson.dumps(text)) + RECORD_ENTRY_BYTES

    def _over_the_limit(self, added: int) -> bool:
        """Whether ``added`` bytes take the record, with the streams let in since it was built, past
        RECORD_FULL_SHARE of ``--max-record-bytes``. With ``_room_lock`` held."""
        return added > 0 and self.record_bytes + sum(self._unreported.values()) + added \
            > RECORD_FULL_SHARE * self.settings.max_record_bytes

    def record_full(self, key: StreamKey) -> bool:
        """Whether the node record has no room for ``key``, a stream this node does not carry yet."""
        with self._room_lock:
            return self._over_the_limit(self._new_entry_bytes(key))

    def _let_in(self, key: StreamKey, enter):
        """``enter()`` (which puts ``key`` in the table), unless the record has no room for it (then
        :data:`NO_ROOM`); a new stream let in counts against the record until a record includes it."""
        with self._room_lock:
            added = self._new_entry_bytes(key)
            if self._over_the_limit(added):
                return NO_ROOM
            entered = enter()
            if added:
                self._unreported[str(key)] = added
            return entered

    def _forget_unreported(self, reported: frozenset[str]) -> None:
        with self._room_lock:
            if self._unreported:
                self._unreported = {k: v for k, v in self._unreported.items()
                                    if k not in reported and self.table.carries(StreamKey.parse(k))}

    def on_publish(self, key: StreamKey, clientid: str, args: dict[str, str]) -> Decision:
        extra = {**self._log_extra, "scope": key.scope, "stream": key.name, "action": "publish"}
        if self.record_full(key):  # before its key is verified: refused all the same
            if self._full_log.allow() is not None:  # a burst: one line
                log.warning("refusing new streams: the node record (%d bytes) is near --max-record-bytes",
                            self.record_bytes, extra=extra)
            return _NO_ROOM_REFUSAL
        if self.settings.role == ROLE_EDGE:
            ours = False
            if self.settings.relay == "nginx" and args.get("flashver") == NGINX_RELAY_FLASHVER:
                # nginx's own pull, answering our 302: its addr is the URL it pulls from, which must
                # be the stream's origin now
                origin = self.origin_address(key)
                pulled = args.get("addr", "").split("?", 1)[0]
                ours = origin is not None and pulled == f"{origin}/{key.scope}/{key.name}"
            if not (ours or self.relay_keys.redeem(key, args.get("relaykey", ""))):
                log.info("refused a publisher on an edge (addr %s, flashver %s)", args.get("addr", "")[:80],
                         args.get("flashver", "")[:40], extra=extra)
                return Decision.refuse("edges accept no publishers: ask the stream manager for an origin")
            if self._let_in(key, lambda: self.table.start_publish(key, clientid, now_ms())) is NO_ROOM:
                return _NO_ROOM_REFUSAL
            self._end_pull(key)
            self.changed()
            return Decision.allow()
        if self.state != STATE_INSERVICE:
            return Decision.refuse(f"node is {self.state}")
        # nginx-rtmp sends publish_done when a publisher leaves while its publish hook is still under way
        # (it marks the stream published before it asks), and hooks are answered on several threads:
        # that publish_done came first, found no publisher, and the publish went live after it, a ghost
        # stream whose claim refused its encoder's reconnection and whose lookups sent viewers to nothing.
        # Each hook has its own mark: a restarted nginx numbers its clients afresh, so the same stream and
        # client id can be a dead nginx's publish, still under way, and the new nginx's at once.
        pending, mine = (str(key), clientid), _UnderWay()
        with self._publish_lock:
            self._publishes_under_way.setdefault(pending, []).append(mine)
        try:
            decision = self._publish_on_origin(key, clientid, args, extra, mine)
        finally:
            with self._publish_lock:
                hooks = self._publishes_under_way[pending]
                hooks.remove(mine)
                if not hooks:
                    del self._publishes_under_way[pending]
        return decision

    def _publish_on_origin(self, key: StreamKey, clientid: str, args: dict[str, str], extra: dict,
                           mine: _UnderWay) -> Decision:
        verdict = self.verifier.verify(str(key), args.get("key", ""), args.get("addr", ""))
        if not verdict.allowed:
            return Decision.refuse(verdict.reason)
        with self._publish_lock:
            # a hook whose publisher left meanwhile (its publish_done came, or its nginx died) starts
            # nothing: after a restart of nginx, the table's entry under this client id can be the next
            # nginx's publisher, whose session this hook took for its own and then undid (a live stream
            # gone from the registry while its encoder went on publishing)
            if mine.left:
                log.info("the publisher left before its publish was allowed", extra=extra)
                return Decision.refuse("the publisher left")
            started = self._let_in(key, lambda: self.table.start_publish(key, clientid, now_ms()))
            if started is NO_ROOM:
                return _NO_ROOM_REFUSAL
        if started is None:
            log.info("refused a second publisher", extra=extra)
            return Decision.refuse(f"stream {key} is already being published on this node")
        record = StreamRecord(self.settings.node_id, started.session_id or "", started.start_ms)
        try:
            owner = self.claims.claim(key, record)
        except KazooException as exc:
            self.table.end_publish(key, clientid)  # undo: refused
            log.warning("could not claim stream: %s", exc, extra=extra)
            return Decision.refuse("the registry is unreachable", 503)
        if owner.session_id != record.session_id and owner.node_id == self.settings.node_id:
            owner = self._replace_stale_claim(key, owner, record)
        if owner.session_id != record.session_id:
            self.table.end_publish(key, clientid)  # undo: refused
            log.info("refused: stream is live on %s", owner.node_id, extra=extra)
            return Decision.refuse(f"stream {key} is already live on node {owner.node_id}")
        try:  # from now on a stream-closed is owed, whatever happens to this agent
            self.sessions.opened(key, record.session_id, clientid, started.start_ms)
        except Exception as exc:  # kazoo's errors and timeouts
            log.warning("could not record the publish session: %s", exc, extra=extra)
            self.table.end_publish(key, clientid)  # undo: refused
            self._release(key, record.session_id)
            return Decision.refuse("the registry is unreachable", 503)
        with self._publish_lock:  # with on_publish_done's: it either sees this publisher, or is seen here
            left = mine.left
            ours = self.table.session_of(key, clientid) == record.session_id
            if left and ours:
                self.table.end_publish(key, clientid)
        if left or not ours:  # the publisher left while it was being allowed: undo the publish
            log.info("the publisher left before its publish was allowed", extra=extra)
            self.sessions.discard(record.session_id)  # nothing was published: no event is owed
            self._release(key, record.session_id)
            self.changed(urgent=True)
            return Decision.refuse("the publisher left")
        self._watch_claim(self.paths.stream(key))
        log.info("stream published", extra=extra)
        self.changed(urgent=True)
        return Decision.allow()

    def _replace_stale_claim(self, key: StreamKey, stale: StreamRecord, record: StreamRecord) -> StreamRecord:
        """A claim of this node whose session is not in the table (left by a publish refused half-way,
        e.g. when ZooKeeper timed out after the claim): replace it with ``record``. Returns the owner."""
        try:
            if self.claims.release(key, stale.session_id):
                return self.claims.claim(key, record)
        except KazooException as exc:
            log.warning("could not replace a stale claim: %s", exc, extra=self._log_extra)
        return stale

    def on_publish_done(self, key: StreamKey, clientid: str) -> None:
        with self._publish_lock:
            session = self.table.end_publish(key, clientid)
            if session is None:
                for hook in self._publishes_under_way.get((str(key), clientid), ()):
                    hook.left = True  # its publish hook undoes it
        if session is None:
            return  # not the publisher (e.g. a refused duplicate)
        self._publish_ended(key, session)

    def _publish_ended(self, key: StreamKey, session: str) -> None:
        self._end_pull(key)
        if self.settings.role == ROLE_ORIGIN:
            self._release(key, session)
            self.sessions.ended(session)
        log.info("stream unpublished", extra={**self._log_extra, "scope": key.scope, "stream": key.name,
                                               "action": "publish_done"})
        self.changed(urgent=True)

    def on_record_done(self, key: StreamKey, clientid: str, path: str) -> None:
        """nginx-rtmp closed a recording (an origin's session): it becomes the session's VOD."""
        self.sessions.recorded(key, clientid, path)

    # -- commands (node_agent.commands; each idempotent) -----------------------------------------
    def _command_close(self, args) -> None:
        """Drop the publisher of ``args["channel"]`` if its session is ``args["session"]`` (or ``*``),
        and wait (bounded) for its publish_done: the stream-closed event follows from it."""
        key = StreamKey.parse(str(args.get("channel", "")))
        wanted = str(args.get("session", "*"))
        for stream in self.table.published():
            if stream.key != key or (wanted != "*" and stream.session_id != wanted):
                continue
            extra = {**self._log_extra, "scope": key.scope, "stream": key.name, "action": "close"}
            log.info("closing session %s on command", stream.session_id, extra=extra)
            if self.media is not None and self.media.drop_publisher(key.scope, key.name):
                deadline = time.monotonic() + CLOSE_WAIT_S
                while time.monotonic() < deadline and self._publishing(stream.session_id):
                    time.sleep(0.05)
            if self._publishing(stream.session_id):  # no media server, or its publish_done was lost
                self.on_publish_done(key, stream.publisher or "")

    def _publishing(self, session_id: str | None) -> bool:
        return any(s.session_id == session_id for s in self.table.published())

    def _command_drain(self, args) -> None:
        """Stop taking new work: lookups stop choosing this node as soon as the record is written."""
        if self.state != STATE_DRAINING:
            log.info("draining on command", extra=self._log_extra)
        self.state = STATE_DRAINING
        self.changed(urgent=True)  # the reporter writes the record at once

    def on_play(self, key: StreamKey, clientid: str, relay: bool) -> Decision:
        if self.settings.role == ROLE_ORIGIN:
            if self.table.publisher_of(key) is None:
                return Decision.refuse(f"stream {key} is not published on this origin", 404)
        else:
            try:
                if self.claims.owner(key) is None:
                    return Decision.refuse(f"stream {key} is not live", 404)
            except KazooException:
                pass  # registry unreachable: let the player wait for the stream
        if self._let_in(key, lambda: self.table.add_player(key, clientid, relay)) is NO_ROOM:
            return _NO_ROOM_REFUSAL
        self.changed()
        if self.settings.role == ROLE_EDGE and self.settings.relay == "nginx" and self.media is not None \
                and self._claim_pull(key):
            origin = self.origin_address(key)
            if origin is not None:  # nginx-rtmp pulls the stream itself (one pull per stream)
                # ?relay= tells the origin this player is an edge's pull, not a viewer
                return Decision(True, 302, "pull", f"rtmp://{origin}/{key.scope}/{key.name}"
                                                   f"?relay={self.settings.node_id}")
        if self.relays is not None:
            self.relays.ensure(key)  # the player is held by nginx until the relay publishes
        return Decision.allow()

    def on_play_done(self, key: StreamKey, clientid: str) -> None:
        if self.table.remove_player(key, clientid):
            self._release_relay_if_unwatched(key)
            self.changed()

    def _release_relay_if_unwatched(self, key: StreamKey) -> None:
        if self.relays is not None:
            load = self.table.loads().get(str(key))
            if load is None or load.subscribers == 0:
                self.relays.release(key)

    def _claim_pull(self, key: StreamKey) -> bool:
        """True for the one play that must start nginx's pull of ``key``: none is publishing here and
        none is on its way (asked for, not yet published, less than PULL_PENDING_S ago). Players that
        follow are held by nginx until the pull publishes."""
        now = time.monotonic()
        with self._pull_lock:
            if self.table.publisher_of(key) is not None:
                return False
            if now - self._pulls.get(str(key), -PULL_PENDING_S) < PULL_PENDING_S:
                return False
            self._pulls[str(key)] = now
            return True

    def _end_pull(self, key: StreamKey) -> None:
        """The pull asked for ``key`` has published or ended: the next play decides afresh."""
        with self._pull_lock:
            self._pulls.pop(str(key), None)

    # -- the media server ------------------------------------------------------------------------
    def is_edge_pull(self, args: dict[str, str]) -> bool:
        """Whether a play that says it is an edge's pull (``?relay=<node id>``, or nginx-rtmp's relay
        flashVer) is one: only on an origin, and only when the named node is a registered edge playing
        from its own address (or a loopback one: on one machine the kernel gives connections between
        loopback addresses 127.0.0.1). A pull is not a viewer, so it is neither counted in the stream's
        subscribers nor against capacity: any player that said so, with ``?relay=x`` or ffmpeg's
        ``-rtmp_flashver``, used to watch uncounted. Anyone else who says so is a viewer."""
        if self.settings.role != ROLE_ORIGIN:
            return False  # an edge's relays publish into it; no play on an edge is a pull
        node_id = args.get("relay", "")
        try:
            validate_name("node", node_id)
            address = ipaddress.ip_address(args.get("addr", ""))  # nginx-rtmp's addr, SRS's ip
            data, _ = self.client.get_async(self.paths.node(node_id)).get(timeout=1)
            node = NodeRecord.from_json(data)
        except (ValueError, RecordError, KazooException, self.client.handler.timeout_exception):
            return False  # not a node id, no such node, or the registry does not answer: a viewer
        return node.role == ROLE_EDGE and (address.is_loopback or str(address) in (node.host, node.private_host))

    def origin_address(self, key: StreamKey) -> str | None:
        """host:port of the origin publishing ``key`` now, from the registry; None if not live."""
        try:
            owner = self.claims.owner(key)
            if owner is None:
                return None
            if owner == UNREADABLE_CLAIM:
                log.warning("cannot resolve the origin of %s: its claim does not decode (a newer agent's?)", key,
                            extra=self._log_extra)
                return None
            data, _ = self.client.get_async(self.paths.node(owner.node_id)).get(timeout=2)
            node = NodeRecord.from_json(data)
            return f"{node.relay_host}:{node.rtmp_port}"
        except (KazooException, RecordError, self.client.handler.timeout_exception) as exc:
            log.warning("cannot resolve the origin of %s: %s", key, exc, extra=self._log_extra)
            return None

    def reconcile(self) -> bool:
        """Align the stream table with nginx's /stat: a client missing from two snapshots in a row is
        gone (its hook was lost); a client nginx has but we do not know is counted as a player."""
        if self.media is None:
            return False
        stat = self.media.stat()
        if stat is None:
            return False
        changed = False
        absent_now: set[tuple[str, str]] = set()
        for key_text, load in self.table.snapshot().items():
            seen = stat.get(key_text)
            present = set(seen.clients) if seen else set()
            publisher = seen.publisher if seen else None
            key = StreamKey.parse(key_text)
            for cid in load.clients:
                if cid in present or cid == publisher:
                    continue
                if (key_text, cid) in self._absent_once:
                    self.on_done(key, cid)
                    changed = True
                else:
                    absent_now.add((key_text, cid))
        table = self.table.snapshot()
        for key_text, seen in stat.items():
            try:
                key = StreamKey.parse(key_text)
            except RecordError:
                continue
            known = table.get(key_text)
            for cid in seen.clients:
                if known is None or cid not in known.clients:
                    self.table.add_player(key, cid, relay=False)
                    changed = True
        self._absent_once = absent_now
        if changed:
            self.changed()
        return changed

    def _media_exited(self) -> None:
        """nginx died (it is restarted next): every client it had went with it and no done hook will
        come; the next nginx numbers its clients afresh. Forget them all now, before it starts: a stale
        publisher refused the encoder's reconnection ("already being published") until the
        reconciliation noticed, and its claim kept the stream "live" meanwhile. A publish whose hook is
        still under way was that nginx's too: its hook undoes it (no publish_done comes from a dead nginx,
        and allowed, it was a ghost stream until the reconciliation noticed)."""
        with self._publish_lock:
            for hooks in self._publishes_under_way.values():
                for hook in hooks:
                    hook.left = True
        ended = []
        for key_text, clients in self.table.snapshot().items():
            key = StreamKey.parse(key_text)
            for clientid in clients.clients:
                session = self.table.end_publish(key, clientid)
                if session is not None:
                    ended.append((key, session))
                elif self.table.remove_player(key, clientid):
                    self._release_relay_if_unwatched(key)
        self._absent_once = set()
        self.changed()
        # the claims' release waits on ZooKeeper (up to its timeout each): not the next nginx's start
        threading.Thread(target=lambda: [self._publish_ended(k, session) for k, session in ended],
                         name="media-exited", daemon=True).start()

    def _media_serving(self, serving: bool) -> None:
        if serving:
            log.info("nginx is serving: back in service", extra=self._log_extra)
        else:
            log.warning("nginx is not serving: out of service until it is back", extra=self._log_extra)
        self.changed(urgent=True)

    def drop_abandoned_viewers(self, now: float | None = None) -> int:
        """On an edge: drop the viewers of streams that have been live nowhere for ``viewer_wait_s`` (the
        publisher stopped and did not come back). nginx holds an edge's players until a relay publishes,
        so they waited for good on a frozen picture, and counted against the edge's capacity. Returns how
        many streams' viewers were dropped."""
        if self.settings.role != ROLE_EDGE or self.media is None:
            return 0
        now = time.monotonic() if now is None else now
        waiting = {}
        for key_text, load in self.table.snapshot().items():
            key = StreamKey.parse(key_text)
            if load.publisher is not None or not load.clients:
                continue  # relayed here now, or nobody waits
            try:
                live = self.claims.owner(key) is not None
            except KazooException:
                live = True  # the registry does not answer: not a reason to drop anyone
            if not live:
                waiting[key_text] = self._live_nowhere_since.get(key_text, now)
        self._live_nowhere_since = waiting
        dropped = 0
        for key_text, since in waiting.items():
            if now - since < self.settings.viewer_wait_s:
                continue
            key = StreamKey.parse(key_text)
            count = self.media.drop_subscribers(key.scope, key.name)
            log.info("dropped %d viewers of a stream live nowhere for %.0f s", count, now - since,
                     extra={**self._log_extra, "scope": key.scope, "stream": key.name})
            dropped += 1
        return dropped

    def _reconcile_loop(self, interval_s: float = 3.0) -> None:
        while not self._stopping.wait(interval_s):
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile with /stat failed", extra=self._log_extra)
            try:
                self.drop_abandoned_viewers()
            except Exception:
                log.exception("dropping the viewers of ended streams failed", extra=self._log_extra)
            if self.media_layout is not None and self.media is not None:
                try:
                    sweep_live_hls(self.media_layout, self.media.config.applications,
                                   {s.key for s in self.table.published()}, playlist_s=self.settings.hls_playlist_s)
                except Exception:
                    log.exception("sweeping old live HLS fragments failed", extra=self._log_extra)

    def on_done(self, key: StreamKey, clientid: str) -> None:
        """A client left (nginx-rtmp ``done``, SRS ``on_close``): whatever it was."""
        self.on_publish_done(key, clientid)
        self.on_play_done(key, clientid)


def _cpu_load() -> float:
    """Share of the machine's cores in use (1-minute load average / cores)."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return 0.0
