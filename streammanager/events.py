"""Stream events owed to the application, queued durably in ZooKeeper (the write side).

Layout (built in ``ZkPaths``)::

    <root>/v1/callbacks/queue/<channel>/ev-<seq>          persistent, sequential: one CallbackEvent
    <root>/v1/callbacks/sessions/<channel>@<session_id>   persistent: an OpenSession, whose
                                                          stream-closed is still owed
    <root>/v1/callbacks/reaped/<channel>@<session_id>     persistent, empty: the reaper closed this
                                                          session for its origin (a tombstone)

Contract:
- An origin's agent writes each event here before anything is sent; the controller leader's
  :class:`streammanager.callbacks.CallbackDispatcher` sends a channel's events in znode order and
  deletes each only after the application answered 200. Order per channel is the sequence order.
- Each event carries a unique ``event_id``: a create retried after a lost connection may queue an event
  twice, and the dispatcher skips the copy (delivery stays at least once, never reordered).
- An :class:`OpenSession` is written when a publish session starts and deleted after its stream-closed
  is queued. If its origin dies first, the dispatcher's reaper queues the stream-closed, and replaces
  the marker with a tombstone: an origin that was only away (frozen past its ZooKeeper session) and
  comes back finds it, drops that publisher and owes the session nothing more, where it used to go on
  with the session and send a second stream-closed at its end. A ZooKeeper that lost its data lost the
  markers and the tombstones alike: there the origin goes on. The origin deletes the tombstones it
  saw; the reaper, those older than ``REAPED_KEEP_S`` (their origin never came back).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import orjson
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, KazooException, NoNodeError, NodeExistsError

from streammanager.models import SCHEMA_VERSION, RecordError
from streammanager.registry import ZkPaths, now_ms

log = logging.getLogger(__name__)

EVENT_STREAM_AVAILABLE = "stream-available"
EVENT_STREAM_CLOSED = "stream-closed"
EVENT_TYPES = (EVENT_STREAM_AVAILABLE, EVENT_STREAM_CLOSED)
STREAM_HLS_LIVE = "HLS-LIVE"
STREAM_HLS_VOD = "HLS-VOD"
STREAM_IMG_PREVIEW = "IMG-PREVIEW"
STREAM_TYPES = (STREAM_HLS_LIVE, STREAM_HLS_VOD, STREAM_IMG_PREVIEW)


def _decode(data: bytes, what: str) -> dict:
    try:
        doc = orjson.loads(data)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"{what} is not a schema {SCHEMA_VERSION} JSON object")
    return doc


@dataclass(frozen=True, slots=True)
class CallbackEvent:
    """One event callback: ``stream-available`` (with stream type, resolution and index file) or
    ``stream-closed`` for one publish session (``session_id``) of one channel (``scope/name``)."""

    channel: str
    session_id: str
    event_type: str
    stream_type: str = ""
    resolution: str = ""  # WIDTHxHEIGHT-FPS
    index_file: str = ""  # absolute path in the shared media directory
    node_id: str = ""  # the origin that queued it
    created_ms: int = 0
    event_id: str = ""

    def __post_init__(self) -> None:
        if self.event_type not in EVENT_TYPES:
            raise RecordError(f"event type must be one of {EVENT_TYPES}, not {self.event_type!r}")
        if self.event_type == EVENT_STREAM_AVAILABLE and self.stream_type not in STREAM_TYPES:
            raise RecordError(f"stream type must be one of {STREAM_TYPES}, not {self.stream_type!r}")
        if not self.channel or not self.session_id:
            raise RecordError("an event needs a channel and a session id")

    @classmethod
    def available(cls, channel: str, session_id: str, stream_type: str, resolution: str, index_file: str,
                  node_id: str = "") -> "CallbackEvent":
        return cls(channel, session_id, EVENT_STREAM_AVAILABLE, stream_type, resolution, index_file, node_id,
                   now_ms(), uuid.uuid4().hex)

    @classmethod
    def closed(cls, channel: str, session_id: str, node_id: str = "") -> "CallbackEvent":
        return cls(channel, session_id, EVENT_STREAM_CLOSED, node_id=node_id, created_ms=now_ms(),
                   event_id=uuid.uuid4().hex)

    def headers(self) -> dict[str, str]:
        """The specification's headers (without Authorization)."""
        headers = {"x-streaming-channel": self.channel, "x-streaming-id": self.session_id,
                   "x-event-type": self.event_type}
        if self.event_type == EVENT_STREAM_AVAILABLE:
            headers.update({"x-stream-type": self.stream_type, "x-resolution": self.resolution,
                            "x-index-file": self.index_file})
        return headers

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "channel": self.channel, "session_id": self.session_id,
                             "event_type": self.event_type, "stream_type": self.stream_type,
                             "resolution": self.resolution, "index_file": self.index_file,
                             "node_id": self.node_id, "created_ms": self.created_ms, "event_id": self.event_id})

    @classmethod
    def from_json(cls, data: bytes) -> "CallbackEvent":
        doc = _decode(data, "callback event")
        try:
            return cls(str(doc["channel"]), str(doc["session_id"]), str(doc["event_type"]),
                       str(doc.get("stream_type", "")), str(doc.get("resolution", "")),
                       str(doc.get("index_file", "")), str(doc.get("node_id", "")),
                       int(doc.get("created_ms", 0)), str(doc.get("event_id", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"bad callback event: {exc}") from exc


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A publish session whose stream-closed is still owed, and the agent run that owes it (a node
    record with another ``started_ms`` is a restarted agent that no longer knows the session)."""

    channel: str
    session_id: str
    node_id: str
    node_started_ms: int
    start_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "channel": self.channel, "session_id": self.session_id,
                             "node_id": self.node_id, "node_started_ms": self.node_started_ms,
                             "start_ms": self.start_ms})

    @classmethod
    def from_json(cls, data: bytes) -> "OpenSession":
        doc = _decode(data, "open session")
        try:
            return cls(str(doc["channel"]), str(doc["session_id"]), str(doc["node_id"]),
                       int(doc["node_started_ms"]), int(doc["start_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"bad open session: {exc}") from exc


class EventQueue:
    """Writes to the callback queue. Each call is one idempotent step retried by the client's retry
    policy (a few attempts); callers that must not lose an event retry ``enqueue`` until it returns."""

    def __init__(self, client: KazooClient, paths: ZkPaths):
        self._client = client
        self._paths = paths

    @property
    def connected(self) -> bool:
        return self._client.connected

    def enqueue(self, event: CallbackEvent) -> str:
        """Append ``event`` to its channel's queue; returns the znode path."""
        path = self._paths.callback_event(event.channel)
        for _ in range(5):
            try:
                return self._client.retry(self._client.create, path, event.to_json(), sequence=True,
                                          makepath=True)
            except NoNodeError:  # the channel's empty parent was removed by the dispatcher meanwhile
                continue
        raise KazooException(f"could not enqueue an event for {event.channel}")

    def open_session(self, session: OpenSession, timeout_s: float | None = None) -> None:
        """Write the marker (idempotent). With ``timeout_s``, one bounded attempt (for a hook):
        raises ``ConnectionLoss`` if ZooKeeper does not answer in time."""
        path = self._paths.callback_session(session.channel, session.session_id)
        try:
            if timeout_s is None:
                self._client.retry(self._client.create, path, session.to_json(), makepath=True)
                return
            if not self._client.connected:
                raise ConnectionLoss("not connected to ZooKeeper")
            try:
                self._client.create_async(path, session.to_json(), makepath=True).get(timeout=timeout_s)
            except self._client.handler.timeout_exception:
                raise ConnectionLoss(f"ZooKeeper did not answer within {timeout_s} s") from None
        except NodeExistsError:
            pass

    def close_session(self, channel: str, session_id: str) -> None:
        try:
            self._client.retry(self._client.delete, self._paths.callback_session(channel, session_id))
        except NoNodeError:
            pass

    def reap_session(self, channel: str, session_id: str) -> None:
        """The reaper's close: the marker replaced by a tombstone, in one transaction (an origin never
        sees the marker gone without the tombstone)."""
        marker = self._paths.callback_session(channel, session_id)
        tombstone = self._paths.callback_reaped_session(channel, session_id)
        self._client.retry(self._client.ensure_path, self._paths.callback_reaped)

        def replace():
            transaction = self._client.transaction()
            transaction.delete(marker)
            transaction.create(tombstone, b"")
            results = transaction.commit()
            failed = [r for r in results if isinstance(r, Exception)]
            if any(isinstance(r, NoNodeError) for r in failed):
                pass  # no marker: its origin closed the session meanwhile (or a retried commit went through)
            elif any(isinstance(r, NodeExistsError) for r in failed):  # reaped before: only the marker goes
                self.close_session(channel, session_id)
            elif failed:
                raise failed[0]

        self._client.retry(replace)

    def reaped(self, sessions: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Which of these (channel, session id) the reaper closed (their tombstone exists)."""
        pending = [(item, self._client.exists_async(self._paths.callback_reaped_session(*item))) for item in sessions]
        return [item for item, result in pending if result.get(timeout=5) is not None]

    def forget_reaped(self, channel: str, session_id: str) -> None:
        try:
            self._client.retry(self._client.delete, self._paths.callback_reaped_session(channel, session_id))
        except NoNodeError:
            pass

