"""Fencing a dead origin before its ZooKeeper session expires.

When an edge's relay from an origin fails, the edge checks whether that origin is dead: its media
server *and* its agent refuse TCP connections (a reset from a live host: the processes are gone, not
merely slow or unreachable, which would time out instead). Then the edge deletes the origin's node record
and the stream records it owned, so lookups stop naming it at once and the broadcaster's new lookup
and republish elsewhere are accepted, instead of after the session timeout.

A mistaken fence heals itself: an agent that is alive finds its record missing on its next report and
registers again (and reclaims its streams).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from urllib.parse import urlsplit

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError

from streammanager.models import NodeRecord, RecordError, StreamKey, StreamRecord
from streammanager.registry import ZkPaths

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.5
MIN_INTERVAL_S = 2.0  # one check per origin at most this often


def refuses(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True only when the address actively refuses (nothing listens there); a timeout is not proof."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class OriginFence:
    def __init__(self, client: KazooClient, paths: ZkPaths, own_node_id: str):
        self._client = client
        self._paths = paths
        self._own = own_node_id
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def relay_failed(self, key: StreamKey, origin: str) -> None:
        """A relay of ``key`` from ``origin`` (host:port) exited: check and fence in the background."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked.get(origin, -MIN_INTERVAL_S) < MIN_INTERVAL_S:
                return
            self._checked[origin] = now
        threading.Thread(target=self._check, args=(key, origin), name="fence-check", daemon=True).start()

    def _check(self, key: StreamKey, origin: str) -> None:
        try:
            self.check(key, origin)
        except (KazooException, RecordError, self._client.handler.timeout_exception) as exc:
            log.warning("could not check origin %s: %s", origin, exc, extra={"node_id": self._own})

    def check(self, key: StreamKey, origin: str) -> str | None:
        """Fence the owner of ``key`` if it is still served from ``origin`` and is dead. Returns the
        fenced node's id, or None."""
        try:
            data, _ = self._client.get(self._paths.stream(key))
        except NoNodeError:
            return None
        owner = StreamRecord.from_json(data).node_id
        if owner == self._own:
            return None
        node_path = self._paths.node(owner)
        try:
            data, stat = self._client.get(node_path)
        except NoNodeError:
            return None
        node = NodeRecord.from_json(data)
        if f"{node.relay_host}:{node.rtmp_port}" != origin:
            return None  # the stream moved on already
        agent = urlsplit(node.agent_url)
        if not refuses(node.relay_host, node.rtmp_port):
            return None
        if not agent.hostname or not agent.port or not refuses(agent.hostname, agent.port):
            return None
        # its stream claims and its record go in one transaction: all or nothing, so an agent that is
        # alive after all sees its record deleted and reclaims every stream, never half of them
        transaction = self._client.transaction()
        fenced_streams = 0
        published = {k for k, load in node.streams.items() if load.publishing} | {str(key)}
        for key_text in sorted(published):  # the relayed stream too, if its record did not show it yet
            path = self._paths.stream(StreamKey.parse(key_text))
            try:
                data, stream_stat = self._client.get(path)
            except NoNodeError:
                continue
            if StreamRecord.from_json(data).node_id == owner:
                transaction.delete(path, version=stream_stat.version)
                fenced_streams += 1
        transaction.delete(node_path, version=stat.version)
        results = transaction.commit()
        if any(isinstance(result, Exception) for result in results):
            return None  # something changed meanwhile (it wrote, or is gone already): leave it
        log.warning("fenced origin %s: its media server and agent at %s refuse connections (removed its "
                    "record and %d stream claim(s) before its session expires)", owner, origin, fenced_streams,
                    extra={"node_id": self._own, "action": "fence"})
        return owner
