"""What one media node carries: publishers, players and relays per stream, keyed by client id.

Pure bookkeeping, no I/O. Every client is keyed by (stream, clientid) so that a refused duplicate
publisher's ``publish_done`` cannot end the real stream.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

from streammanager.models import StreamKey, StreamLoad


@dataclass
class StreamState:
    key: StreamKey
    publisher: str | None = None  # clientid of the publisher
    session_id: str | None = None  # one publish session
    start_ms: int = 0
    players: set[str] = field(default_factory=set)
    relays: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.publisher is None and not self.players and not self.relays

    def load(self) -> StreamLoad:
        return StreamLoad(len(self.players), len(self.relays), self.publisher is not None, self.start_ms)


@dataclass(frozen=True)
class ClientSet:
    publisher: str | None
    clients: frozenset[str]


class StreamTable:
    """Thread-safe table of streams on this node."""

    def __init__(self) -> None:
        self._streams: dict[str, StreamState] = {}
        self._lock = threading.Lock()

    def publisher_of(self, key: StreamKey) -> str | None:
        with self._lock:
            state = self._streams.get(str(key))
            return state.publisher if state else None

    def carries(self, key: StreamKey) -> bool:
        with self._lock:
            return str(key) in self._streams

    def session_of(self, key: StreamKey, clientid: str) -> str | None:
        """The publish session of ``clientid`` on ``key``; None if it is not the stream's publisher."""
        with self._lock:
            state = self._streams.get(str(key))
            return state.session_id if state is not None and state.publisher == clientid else None

    def start_publish(self, key: StreamKey, clientid: str, now_ms: int) -> StreamState | None:
        """Record a publisher; None if another client already publishes the stream here."""
        with self._lock:
            state = self._streams.setdefault(str(key), StreamState(key))
            if state.publisher is not None and state.publisher != clientid:
                return None
            if state.publisher is None:
                state.publisher = clientid
                state.session_id = uuid.uuid4().hex
                state.start_ms = now_ms
            return StreamState(key, state.publisher, state.session_id, state.start_ms)

    def end_publish(self, key: StreamKey, clientid: str) -> str | None:
        """Remove the publisher if it is ``clientid``; return its session id (None: not the publisher)."""
        with self._lock:
            state = self._streams.get(str(key))
            if state is None or state.publisher != clientid:
                return None
            session = state.session_id
            state.publisher, state.session_id, state.start_ms = None, None, 0
            if state.empty:
                del self._streams[str(key)]
            return session

    def add_player(self, key: StreamKey, clientid: str, relay: bool) -> None:
        with self._lock:
            state = self._streams.setdefault(str(key), StreamState(key))
            (state.relays if relay else state.players).add(clientid)

    def remove_player(self, key: StreamKey, clientid: str) -> bool:
        with self._lock:
            state = self._streams.get(str(key))
            if state is None or (clientid not in state.players and clientid not in state.relays):
                return False
            state.players.discard(clientid)
            state.relays.discard(clientid)
            if state.empty:
                del self._streams[str(key)]
            return True

    def snapshot(self) -> dict[str, "ClientSet"]:
        """Every stream's client ids (publisher, players and relays)."""
        with self._lock:
            return {key: ClientSet(s.publisher, frozenset(s.players | s.relays)
                                   | ({s.publisher} if s.publisher else frozenset()))
                    for key, s in self._streams.items()}

    def published(self) -> list[StreamState]:
        with self._lock:
            return [StreamState(s.key, s.publisher, s.session_id, s.start_ms)
                    for s in self._streams.values() if s.publisher is not None]

    def loads(self) -> dict[str, StreamLoad]:
        with self._lock:
            return {key: state.load() for key, state in self._streams.items()}
