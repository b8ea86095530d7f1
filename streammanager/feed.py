"""One registry watcher per host, feeding every API worker of that host.

Each API worker used to watch the node records itself. At a thousand nodes changing 100 times a
second, every change then cost each worker a watch event, a read sent and answered, and three thread
hand-offs inside kazoo, all competing for the GIL with request threads: ``make bench`` measured the
workers' lookups a second halved against a registry that did not change, and decoding the records was
only a tenth of that loss (the rest was kazoo's per-change machinery in every worker, and ZooKeeper
serving each worker's reads and watches).

So ``streammanager serve`` starts one feed process beside its workers (``python -m streammanager.feed``).
It watches the node records with one ZooKeeper session (:class:`~streammanager.zkcache.ChildrenDataCache`)
and streams them to the workers over a Unix socket in a private directory: a full snapshot when a
worker connects, then the changes, coalesced for ``FLUSH_S`` so a worker wakes once for a batch, and the
feed's connection state, and a heartbeat each second when nothing changed (a worker that hears nothing
for ``SILENCE_S`` takes the feed for hung). A worker decodes and applies the records itself (:class:`FeedCache`). If the
feed is missing or dies, each worker goes back to watching ZooKeeper directly: the feed makes the
registry cheaper, never a single point of failure. ``serve`` starts a feed that exits again, and a
worker watching by itself returns to a feed once one has loaded the registry and answers.

Frames: a 5-byte header (kind, payload length) then the payload. A batch or snapshot is a run of
entries (name length, data length or -1 for a removed child, name, data).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import threading
import time
from typing import Callable

from kazoo.client import KazooClient, KazooState

from streammanager.zkcache import ChangeListener, ChildrenDataCache, KnownChildren


def now_ms() -> int:
    return int(time.time() * 1000)


log = logging.getLogger("streammanager.feed")  # also when run as __main__ (python -m)

HEADER = struct.Struct("!BI")
ENTRY = struct.Struct("!Hi")
SNAPSHOT, BATCH, READY, STATE, HEARTBEAT = 1, 2, 3, 4, 5
STATE_BODY = struct.Struct("!Bq")  # connected, disconnected since (ms, 0 while connected)
FLUSH_S = 0.02  # changes coalesce this long: at 100 changes/s a worker wakes 50 times, not 100+
SEND_TIMEOUT_S = 5.0  # a worker that reads nothing for this long is dropped (it watches by itself then)
MAX_FRAME = 256 * 1024 * 1024
HEARTBEAT_S = 1.0  # a feed with nothing to send says so this often
SILENCE_S = 5.0  # a worker that hears nothing for this long takes the feed for hung and watches by itself


def encode_entries(entries: dict[str, bytes | None]) -> bytes:
    parts = []
    for name, data in entries.items():
        raw = name.encode()
        parts.append(ENTRY.pack(len(raw), -1 if data is None else len(data)))
        parts.append(raw)
        if data is not None:
            parts.append(data)
    return b"".join(parts)


def decode_entries(payload: bytes) -> list[tuple[str, bytes | None]]:
    entries = []
    view = memoryview(payload)
    at = 0
    while at < len(payload):
        name_len, data_len = ENTRY.unpack_from(view, at)
        at += ENTRY.size
        name = bytes(view[at:at + name_len]).decode()
        at += name_len
        if data_len < 0:
            entries.append((name, None))
        else:
            entries.append((name, bytes(view[at:at + data_len])))
            at += data_len
    if at != len(payload):
        raise ValueError("truncated feed entries")
    return entries


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class _Subscriber:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()  # one writer at a time; the snapshot goes out before any batch
        self.alive = True
        self.hung = False  # it stopped reading (a send timed out), rather than closed its end (it exited)

    def send(self, data: bytes) -> bool:
        if not self.alive:
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError as exc:
            self.alive = False
            self.hung = isinstance(exc, TimeoutError)
            self.sock.close()
            return False


class RegistryFeed:
    """Watches ``path``'s children with one session and streams them to subscribers on ``socket_path``."""

    def __init__(self, client: KazooClient, path: str, socket_path: str, flush_s: float = FLUSH_S):
        self._client = client
        self._path = path
        self._socket_path = socket_path
        self._flush_s = flush_s
        self._lock = threading.Lock()
        self._data: dict[str, bytes] = {}  # the latest data of every child
        self._pending: dict[str, bytes | None] = {}  # changed since the last flush
        self._subscribers: list[_Subscriber] = []
        self._initialized = False
        # READY is sent (to a worker that connects, or to all) only while the cache is in sync: after
        # the feed loses ZooKeeper its records are stale until the reconnection has read them all again,
        # and a worker watching by itself must not switch to them (streammanager.registry)
        self._synced = False
        self._ready_pending = False
        self._state = (False, now_ms())  # connected, disconnected since
        self._state_pending = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._cache: ChildrenDataCache | None = None

    def start(self) -> None:
        """Connect to ZooKeeper (retrying until it answers or the feed is closed), then listen: the
        socket appears once the feed can serve, and workers that came earlier watch by themselves."""
        self._client.add_listener(self._on_state)
        while not self._closed.is_set():
            try:
                self._client.start(timeout=5.0)
                break
            except Exception as exc:  # kazoo raises its own timeout types
                log.warning("registry feed: ZooKeeper not reachable yet (%s): retrying", exc)
                self._closed.wait(1.0)
        else:
            return
        self._on_state(KazooState.CONNECTED)
        self._cache = ChildrenDataCache(self._client, self._path, self._on_change, self._on_initialized,
                                        on_synced=self._on_synced)
        self._cache.start()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._socket_path + ".new")
        os.chmod(self._socket_path + ".new", 0o600)
        listener.listen(64)
        os.replace(self._socket_path + ".new", self._socket_path)  # appears only when listening
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="feed-accept", daemon=True).start()
        threading.Thread(target=self._flush_loop, name="feed-flush", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._cache is not None:
            self._cache.close()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sub in self._subscribers:
                sub.sock.close()
        try:
            self._client.stop()
            self._client.close()
        except Exception:  # stopping anyway
            pass

    # -- from the cache (kazoo's completion thread) and the client ------------------------------
    def _on_change(self, name: str, data: bytes | None) -> None:
        with self._lock:
            if data is None:
                self._data.pop(name, None)
            else:
                self._data[name] = data
            self._pending[name] = data
        self._wake.set()

    def _on_initialized(self) -> None:
        with self._lock:
            self._initialized = True
            self._ready_pending = True
        log.info("registry feed loaded %d node records", len(self._data))
        self._wake.set()

    def _on_synced(self) -> None:
        with self._lock:
            if not self._state[0]:
                return  # read before the connection went: the reconnection reads again
            self._synced = True
            self._ready_pending = True
        self._wake.set()

    def _on_state(self, state: str) -> None:
        with self._lock:
            if state == KazooState.CONNECTED:
                self._state = (True, 0)
            else:
                self._synced = False
                if self._state[0]:
                    self._state = (False, now_ms())
            self._state_pending = True
        self._wake.set()

    # -- to the workers ------------------------------------------------------------------------
    def _state_frame(self) -> bytes:
        connected, since = self._state
        return frame(STATE, STATE_BODY.pack(int(connected), since))

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.settimeout(SEND_TIMEOUT_S)
            sub = _Subscriber(sock)
            with sub.lock:
                with self._lock:
                    snapshot = frame(SNAPSHOT, encode_entries(dict(self._data)))
                    # READY while disconnected too, after the STATE frame that says so: a worker that
                    # starts (a reload, a restarted worker) while ZooKeeper is away has no view but
                    # this one, the very one the other workers answer from; without it, it answered
                    # 503 to every lookup until ZooKeeper came back. A worker watching by itself
                    # still passes such a feed over (FeedCache.catch_up waits for a connected READY).
                    # Connected but not yet read again after a reconnection: no READY (a moment).
                    loaded = self._initialized and (self._synced or not self._state[0])
                    ready = frame(READY) if loaded else b""
                    state = self._state_frame()
                    self._subscribers.append(sub)
                sub.send(snapshot + state + ready)

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            woken = self._wake.wait(HEARTBEAT_S)
            if self._closed.is_set():
                return
            if woken:
                time.sleep(self._flush_s)  # let a burst of changes gather into one batch
            self._wake.clear()
            with self._lock:
                out = b""
                if self._pending:
                    out += frame(BATCH, encode_entries(self._pending))
                    self._pending = {}
                if self._state_pending:
                    out += self._state_frame()
                    self._state_pending = False
                if self._ready_pending:
                    out += frame(READY)
                    self._ready_pending = False
                if not out:  # nothing changed: a heartbeat, so that workers can tell quiet from hung
                    out = frame(HEARTBEAT)
                self._subscribers = [s for s in self._subscribers if s.alive]
                subscribers = list(self._subscribers)
            for sub in subscribers:
                with sub.lock:
                    if sub.send(out):
                        continue
                    if sub.hung:
                        log.warning("a worker stopped reading the registry feed: dropped (it watches by itself)")
                    else:  # every worker's exit (a reload, a restart) was logged as a hung worker
                        log.info("a worker left the registry feed")


class FeedLost(Exception):
    pass


class FeedCache:
    """The worker's side: the same callbacks as :class:`ChildrenDataCache`, fed from the feed's socket.

    ``on_state(connected, disconnected_since_ms)`` reports the feed's ZooKeeper connection;
    ``on_lost()`` runs (on the reader thread, after its last change) when the feed goes away."""

    def __init__(self, socket_path: str, on_change: ChangeListener, on_initialized: Callable[[], None],
                 on_state: Callable[[bool, int | None], None], on_lost: Callable[[], None]):
        self._socket_path = socket_path
        self._on_initialized = on_initialized
        self._on_state = on_state
        self._on_lost = on_lost
        self._known = KnownChildren(on_change, "registry feed")
        self._initialized = False
        self._closed = False
        self._sock: socket.socket | None = None
        self._caught_up: dict[str, bytes | None] | None = None  # from catch_up(), for resume()
        self._caught_up_state: tuple[bool, int | None] | None = None

    @property
    def known(self) -> set[str]:
        """Children reported present (read it from the reader thread, or after ``on_lost``)."""
        return set(self._known.names)

    def start(self) -> None:
        """Connect (OSError when there is no feed) and read in the background. A feed silent for
        ``SILENCE_S`` (it sends a heartbeat every ``HEARTBEAT_S`` when nothing changes) counts as lost:
        a hung feed would otherwise freeze the view while /healthz said all was well."""
        self.connect()
        self._reader()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(SILENCE_S)
        self._sock = sock

    def catch_up(self, timeout_s: float) -> None:
        """Read, now, everything up to the feed's first READY (its snapshot and the changes since) without
        telling the listener: a view that watches ZooKeeper by itself switches only to a feed that has
        loaded the whole registry and answers (a feed restarted a moment ago sends part of it first, a
        hung one nothing). Raises FeedLost, OSError or ValueError; :meth:`resume` applies what was read."""
        deadline = time.monotonic() + timeout_s
        entries: dict[str, bytes | None] = {}
        state = None
        while True:
            if time.monotonic() > deadline:
                raise FeedLost(f"the registry feed did not load the registry within {timeout_s:g} s")
            kind, payload = self._read_frame()
            if kind == SNAPSHOT:
                entries = dict(decode_entries(payload))
            elif kind == BATCH:
                entries.update(decode_entries(payload))
            elif kind == STATE:
                connected, since = STATE_BODY.unpack(payload)
                state = (bool(connected), None if connected else since)
            elif kind == READY and (state is None or state[0]):
                # a READY while the feed says it is disconnected: its records may be stale (it lost
                # ZooKeeper, or was stopped past its session); wait for the READY after it has read again
                self._caught_up, self._caught_up_state = entries, state
                return

    def caught_up_names(self) -> set[str]:
        """The children present in what :meth:`catch_up` read."""
        return {name for name, data in (self._caught_up or {}).items() if data is not None}

    def resume(self, known: set[str], keep: set[str] = frozenset()) -> None:
        """After :meth:`catch_up`: tell the listener what was read (children in ``known``, which it has
        from another source, and not in the feed are reported removed, but for those in ``keep``: known
        to exist, newer than the feed's snapshot), then read on in the background."""
        entries, self._caught_up = self._caught_up or {}, None
        self._known.names |= known
        self._known.remove_missing({name for name, data in entries.items() if data is not None} | set(keep))
        for name, data in entries.items():
            self._known.report(name, data)
        if self._caught_up_state is not None:
            self._on_state(*self._caught_up_state)
        self._initialized = True  # the listener was initialised by the other source
        self._reader()

    def _reader(self) -> None:
        threading.Thread(target=self._read_loop, name="registry-feed", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def discard(self) -> None:
        """Close a feed that was connected (or caught up with) but never resumed."""
        self.close()
        if self._sock is not None:
            self._sock.close()

    def _read_exact(self, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            try:
                chunk = self._sock.recv(min(remaining, 1 << 20))
            except socket.timeout:
                raise FeedLost(f"the registry feed sent nothing for {SILENCE_S:g} s (hung?)") from None
            if not chunk:
                raise FeedLost("the registry feed closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _read_frame(self) -> tuple[int, bytes]:
        kind, size = HEADER.unpack(self._read_exact(HEADER.size))
        if size > MAX_FRAME:
            raise FeedLost(f"feed frame of {size} bytes")
        return kind, self._read_exact(size) if size else b""

    def _read_loop(self) -> None:
        try:
            while True:
                kind, payload = self._read_frame()
                if kind == SNAPSHOT:
                    entries = decode_entries(payload)
                    self._known.remove_missing({name for name, _ in entries})
                    for name, data in entries:
                        self._known.report(name, data)
                elif kind == BATCH:
                    for name, data in decode_entries(payload):
                        self._known.report(name, data)
                elif kind == STATE:
                    connected, since = STATE_BODY.unpack(payload)
                    self._on_state(bool(connected), None if connected else since)
                elif kind == READY and not self._initialized:
                    self._initialized = True
                    self._on_initialized()
        except (OSError, FeedLost, ValueError, struct.error) as exc:
            if self._closed:
                return
            log.warning("registry feed lost (%s): this worker watches ZooKeeper by itself", exc)
        finally:
            if self._sock is not None:
                self._sock.close()
        self._on_lost()


def main(argv: list[str] | None = None) -> int:
    """``python -m streammanager.feed --socket PATH``: the feed of ``streammanager serve`` (settings
    from the same SM_* environment); stops on SIGTERM, and with its parent."""
    from streammanager import logs
    from streammanager.config import ServerSettings
    from streammanager.process import stop_event_on_signals
    from streammanager.registry import ZkPaths, make_client

    parser = argparse.ArgumentParser(prog="streammanager.feed")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    settings = ServerSettings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    stop = stop_event_on_signals()
    client = make_client(settings.zk_hosts, settings.zk_timeout_s, settings.zk_auth)
    feed = RegistryFeed(client, ZkPaths(settings.zk_root).nodes, args.socket)
    threading.Thread(target=feed.start, name="feed-start", daemon=True).start()
    stop.wait()
    feed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
