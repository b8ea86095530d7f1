"""The node agent: registers its media node in ZooKeeper, reports load, and decides on hooks.

Contract:
- The node record is an ephemeral znode of the agent's session, rewritten every report interval
  (a heartbeat) and soon after any change. If the session is lost, the next report registers the node
  again and claims every stream it still publishes.
- On an origin, a publish claims the stream's ephemeral znode (the one synchronous ZooKeeper write on a
  hook); a stream live anywhere else, or a second publisher here, is refused.
- ``stop()`` deregisters at once: stream claims and node record deleted, session closed.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError

from node_agent.config import AgentSettings
from node_agent.state import StreamTable
from streammanager.models import (
    ROLE_EDGE,
    ROLE_ORIGIN,
    STATE_INSERVICE,
    NodeRecord,
    StreamKey,
    StreamRecord,
)
from streammanager.registry import StreamClaims, ZkPaths, ensure_layout, make_client, now_ms

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    message: str = "OK"

    @classmethod
    def allow(cls) -> "Decision":
        return cls(True)

    @classmethod
    def refuse(cls, message: str, status: int = 403) -> "Decision":
        return cls(False, status, message)


class Agent:
    def __init__(self, settings: AgentSettings, client: KazooClient | None = None):
        self.settings = settings
        self.paths = ZkPaths(settings.zk_root)
        self.client = client or make_client(settings.zk_hosts, settings.zk_timeout_s)
        self.claims = StreamClaims(self.client, self.paths)
        self.table = StreamTable()
        self.relay_secret = secrets.token_hex(16)  # edges accept publishers only with it (our relays)
        self.state = STATE_INSERVICE
        self.started_ms = now_ms()
        self._registered_session: int | None = None
        self._last_content: tuple | None = None
        self._last_write = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reporter: threading.Thread | None = None
        self._log_extra = {"node_id": settings.node_id, "role": settings.role, "region": settings.region}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, connect_timeout_s: float = 30.0) -> None:
        self.client.start(timeout=connect_timeout_s)
        ensure_layout(self.client, self.paths)
        self.report(force=True)
        self._reporter = threading.Thread(target=self._report_loop, name="agent-reporter", daemon=True)
        self._reporter.start()
        log.info("agent registered", extra=self._log_extra)

    def stop(self) -> None:
        """Deregister at once: closing the session makes ZooKeeper delete the node record and every
        stream claim in one step, and never blocks on an unreachable ZooKeeper."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        if self._reporter is not None:
            self._reporter.join(5.0)
        try:
            self.client.stop()
        finally:
            self.client.close()
        log.info("agent deregistered", extra=self._log_extra)

    # -- reporting -------------------------------------------------------------------------------
    def record(self) -> NodeRecord:
        s = self.settings
        return NodeRecord(
            id=s.node_id, group=s.group, region=s.region, role=s.role, host=s.host, rtmp_port=s.rtmp_port,
            agent_url=s.agent_url, capacity=s.capacity, state=self.state, streams=self.table.loads(),
            cpu=_cpu_load(), updated_ms=now_ms(), started_ms=self.started_ms,
        )

    def report(self, force: bool = False) -> bool:
        """Write the node record if it changed, or if a heartbeat is due, or with ``force``; after a
        new session, register it again and reclaim streams. Returns whether it wrote. Skipped while
        disconnected: the session's return (or a new one) brings the next report."""
        if not self.client.connected:
            return False
        session = self.client.client_id[0] if self.client.client_id else None
        record = self.record()
        content = (record.state, record.capacity, dict(record.streams), round(record.cpu, 1))
        heartbeat_due = time.monotonic() - self._last_write >= self.settings.heartbeat_interval_s
        if session == self._registered_session and content == self._last_content and not (heartbeat_due or force):
            return False
        data = record.to_json()
        path = self.paths.node(self.settings.node_id)
        if session != self._registered_session:
            self._register(path, data)
            self._reclaim_streams()
            self._registered_session = session
        else:
            try:
                self.client.set(path, data)
            except NoNodeError:
                self._register(path, data)
        self._last_content = content
        self._last_write = time.monotonic()
        return True

    def _register(self, path: str, data: bytes) -> None:
        try:
            self.client.create(path, data, ephemeral=True, makepath=True)
        except NodeExistsError:
            _, stat = self.client.get(path)
            if stat.ephemeralOwner != self.client.client_id[0]:
                log.warning("replacing a node record left by an earlier session of this node id",
                            extra=self._log_extra)
                self.client.delete(path)
                self.client.create(path, data, ephemeral=True, makepath=True)
            else:
                self.client.set(path, data)

    def _reclaim_streams(self) -> None:
        for stream in self.table.published():
            record = StreamRecord(self.settings.node_id, stream.session_id or "", stream.start_ms)
            owner = self.claims.claim(stream.key, record)
            if owner.session_id != record.session_id and owner.node_id != self.settings.node_id:
                log.warning("stream was claimed elsewhere while this node was away: %s", owner.node_id,
                            extra={**self._log_extra, "scope": stream.key.scope, "stream": stream.key.name})

    def changed(self) -> None:
        self._wake.set()

    def _report_loop(self) -> None:
        """Report soon after a change (at most one write per report interval) and at least every
        heartbeat interval."""
        while not self._stopping.is_set():
            self._wake.wait(self.settings.heartbeat_interval_s)
            if self._stopping.is_set():
                break
            self._wake.clear()
            try:
                if self.report():
                    self._stopping.wait(self.settings.report_interval_s)
            except KazooException as exc:
                log.warning("load report failed: %s", exc, extra=self._log_extra)
            except Exception:
                log.exception("load report failed", extra=self._log_extra)

    # -- hook decisions --------------------------------------------------------------------------
    def on_publish(self, key: StreamKey, clientid: str, args: dict[str, str]) -> Decision:
        extra = {**self._log_extra, "scope": key.scope, "stream": key.name, "action": "publish"}
        if self.settings.role == ROLE_EDGE:
            given = args.get("relaykey", "")
            if not (given and hmac.compare_digest(given.encode(), self.relay_secret.encode())):
                log.info("refused a publisher on an edge", extra=extra)
                return Decision.refuse("edges accept no publishers: ask the stream manager for an origin")
            self.table.start_publish(key, clientid, now_ms())
            self.changed()
            return Decision.allow()
        if self.state != STATE_INSERVICE:
            return Decision.refuse(f"node is {self.state}")
        started = self.table.start_publish(key, clientid, now_ms())
        if started is None:
            log.info("refused a second publisher", extra=extra)
            return Decision.refuse(f"stream {key} is already being published on this node")
        record = StreamRecord(self.settings.node_id, started.session_id or "", started.start_ms)
        try:
            owner = self.claims.claim(key, record)
        except KazooException as exc:
            self.table.abort_publish(key, clientid)
            log.warning("could not claim stream: %s", exc, extra=extra)
            return Decision.refuse("the registry is unreachable", 503)
        if owner.session_id != record.session_id:
            self.table.abort_publish(key, clientid)
            log.info("refused: stream is live on %s", owner.node_id, extra=extra)
            return Decision.refuse(f"stream {key} is already live on node {owner.node_id}")
        log.info("stream published", extra=extra)
        self.changed()
        return Decision.allow()

    def on_publish_done(self, key: StreamKey, clientid: str) -> None:
        session = self.table.end_publish(key, clientid)
        if session is None:
            return  # not the publisher (e.g. a refused duplicate)
        if self.settings.role == ROLE_ORIGIN:
            try:
                self.claims.release(key, session)
            except KazooException as exc:
                log.warning("could not release stream: %s", exc, extra=self._log_extra)
        log.info("stream unpublished", extra={**self._log_extra, "scope": key.scope, "stream": key.name,
                                               "action": "publish_done"})
        self.changed()

    def on_play(self, key: StreamKey, clientid: str, relay: bool) -> Decision:
        if self.state == "stopping":
            return Decision.refuse("node is stopping")
        if self.settings.role == ROLE_ORIGIN:
            if self.table.publisher_of(key) is None:
                return Decision.refuse(f"stream {key} is not published on this origin", 404)
        else:
            try:
                if self.claims.owner(key) is None:
                    return Decision.refuse(f"stream {key} is not live", 404)
            except KazooException:
                pass  # registry unreachable: let the player wait for the stream
        self.table.add_player(key, clientid, relay)
        self.changed()
        return Decision.allow()

    def on_play_done(self, key: StreamKey, clientid: str) -> None:
        if self.table.remove_player(key, clientid):
            self.changed()

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
