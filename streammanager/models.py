"""Registry records: frozen dataclasses, one JSON codec each, schema-versioned.

Raw dicts from ZooKeeper are decoded here and nowhere else. A record that cannot be decoded raises
:class:`RecordError`; callers drop it (and log) instead of letting it poison the view.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple

import orjson

SCHEMA_VERSION = 1

ROLE_ORIGIN = "origin"
ROLE_EDGE = "edge"
ROLES = (ROLE_ORIGIN, ROLE_EDGE)

STATE_STARTING = "starting"
STATE_INSERVICE = "inservice"
STATE_DRAINING = "draining"
NODE_STATES = (STATE_STARTING, STATE_INSERVICE, STATE_DRAINING)

MAX_NAME_LENGTH = 128
# One path segment without percent-encoding: RFC 3986 unreserved characters plus the sub-delims and
# ':' '@' that a segment may hold, minus '&' '+' ';' '=' that query strings and stream keys give meaning to.
_NAME_RE = re.compile(r"[A-Za-z0-9._~!$'()*,:@-]+")


class RecordError(ValueError):
    """A registry record or a name that does not decode or validate."""


def _finite(value) -> float:
    number = float(value)
    if not math.isfinite(number):  # "nan" and "inf" parse, and would make the API's JSON invalid
        raise ValueError(f"not a finite number: {value!r}")
    return number


def validate_name(kind: str, value: str | None) -> str:
    """Return ``value`` if it is a usable scope or stream name, else raise :class:`RecordError`."""
    if value and len(value) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(value) and ".." not in value and value != ".":
        return value  # every lookup comes here: the usual answer first, the reasons after
    if value is None or value == "":
        raise RecordError(f"{kind} name is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise RecordError(f"{kind} name is longer than {MAX_NAME_LENGTH} characters")
    if value in (".", "..") or not _NAME_RE.fullmatch(value):
        raise RecordError(
            f"{kind} name {value[:40]!r} holds characters that cannot be one path segment "
            "(allowed: letters, digits and . _ ~ - ! $ ' ( ) * , : @)"
        )
    if ".." in value:
        # nginx-rtmp's HLS (on every origin) refuses such a stream ("hls: bad stream name"): a lookup
        # answered an origin whose nginx then dropped the publisher with no reason the encoder could see
        raise RecordError(f"{kind} name {value[:40]!r} holds '..', which the media servers refuse")
    return value


@dataclass(frozen=True, slots=True)
class StreamKey:
    """A stream's identity: its scope (without slashes) and its name."""

    scope: str
    name: str

    @classmethod
    def parse(cls, key: str) -> "StreamKey":
        scope, sep, name = key.partition("/")
        if not sep:
            raise RecordError(f"stream key {key[:60]!r} is not scope/name")
        return cls(validate_name("scope", scope), validate_name("stream", name))

    @classmethod
    def validated(cls, scope: str | None, name: str | None) -> "StreamKey":
        return cls(validate_name("scope", scope), validate_name("stream", name))

    def __str__(self) -> str:
        return f"{self.scope}/{self.name}"

    @property
    def scope_path(self) -> str:
        """The scope as the 2.0 API answers it, with its leading slash."""
        return "/" + self.scope


class StreamLoad(NamedTuple):
    """What one node carries of one stream. A tuple of plain values: the registry view holds hundreds
    of thousands of these, and tuples of atoms cost the garbage collector nothing."""

    subscribers: int = 0  # viewers playing from this node (relays excluded)
    relays: int = 0  # edges pulling this stream from this node
    publishing: bool = False  # a publisher (encoder or relay) is feeding it here
    start_ms: int = 0  # when publishing started on this node

    def to_json(self) -> list:
        return [self.subscribers, self.relays, int(self.publishing), self.start_ms]

    @classmethod
    def from_json(cls, raw: Any) -> "StreamLoad":
        # more than four: what a later release appends (an additive change needs no new schema version)
        if not isinstance(raw, list) or len(raw) < 4:
            raise RecordError("stream load must be [subscribers, relays, publishing, start_ms]")
        subs, relays, publishing, start_ms = raw[:4]
        for value in (subs, relays, start_ms):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RecordError("stream load counts must be non-negative integers")
        return cls(subs, relays, bool(publishing), start_ms)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A media node as its agent registers it (ephemeral znode ``nodes/<id>``)."""

    id: str
    group: str
    region: str
    role: str
    host: str  # the serverAddress clients connect to
    rtmp_port: int
    agent_url: str
    capacity: int  # origins: publishers; edges: subscribers
    state: str = STATE_INSERVICE
    streams: Mapping[str, StreamLoad] = field(default_factory=dict)  # "scope/name" -> load
    cpu: float = 0.0
    updated_ms: int = 0
    started_ms: int = 0
    private_host: str = ""  # where other nodes reach its media server, when not ``host`` (a cloud's private IP)

    @property
    def relay_host(self) -> str:
        return self.private_host or self.host

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RecordError(f"role must be one of {ROLES}, not {self.role!r}")
        if self.state not in NODE_STATES:
            raise RecordError(f"state must be one of {NODE_STATES}, not {self.state!r}")
        if not isinstance(self.capacity, int) or isinstance(self.capacity, bool) or self.capacity < 0:
            raise RecordError("capacity must be a non-negative integer")
        if not isinstance(self.rtmp_port, int) or isinstance(self.rtmp_port, bool) or not 0 < self.rtmp_port < 65536:
            raise RecordError("rtmp_port must be a port number (1 to 65535)")
        if not isinstance(self.agent_url, str):
            raise RecordError("agent_url must be a string")
        for name in ("id", "group", "region", "host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"{name} must be a non-empty string")

    @property
    def publishers(self) -> int:
        return sum(1 for load in self.streams.values() if load.publishing)

    @property
    def subscribers(self) -> int:
        return sum(load.subscribers for load in self.streams.values())

    @property
    def used(self) -> int:
        """Capacity units in use: publishers on an origin, viewers on an edge."""
        return self.publishers if self.role == ROLE_ORIGIN else self.subscribers

    def with_changes(self, **changes: Any) -> "NodeRecord":
        return replace(self, **changes)

    def to_json(self) -> bytes:
        doc = {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "group": self.group,
            "region": self.region,
            "role": self.role,
            "host": self.host,
            "rtmp_port": self.rtmp_port,
            "agent_url": self.agent_url,
            "capacity": self.capacity,
            "state": self.state,
            "streams": {key: load.to_json() for key, load in self.streams.items()},
            "cpu": round(self.cpu, 3),
            "updated_ms": self.updated_ms,
            "started_ms": self.started_ms,
        }
        if self.private_host:
            doc["private_host"] = self.private_host
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, data: bytes, previous: "NodeRecord | None" = None) -> "NodeRecord":
        """Decode a record. With ``previous`` (the same node's last record), stream entries whose JSON
        is unchanged reuse its already validated objects: a node rewrites its record every second or
        two, and most of its streams have not changed since."""
        doc = _load(data)
        try:
            raw_streams = doc.get("streams", {})
            if not isinstance(raw_streams, dict):
                raise RecordError("streams must be an object")
            streams = {}
            old = previous.streams if previous is not None else {}
            for key, raw in raw_streams.items():
                kept = old.get(key)
                if kept is not None and isinstance(raw, list) and tuple(raw) == kept:
                    streams[key] = kept
                    continue
                StreamKey.parse(key)
                streams[key] = StreamLoad.from_json(raw)
            return cls(
                id=doc["id"],
                group=doc["group"],
                region=doc["region"],
                role=doc["role"],
                host=doc["host"],
                rtmp_port=doc["rtmp_port"],
                agent_url=doc.get("agent_url", ""),
                capacity=doc["capacity"],
                state=doc.get("state", STATE_INSERVICE),
                streams=streams,
                cpu=_finite(doc.get("cpu", 0.0)),
                updated_ms=int(doc.get("updated_ms", 0)),
                started_ms=int(doc.get("started_ms", 0)),
                private_host=str(doc.get("private_host", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"bad node record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """Ownership of a live stream (ephemeral znode ``streams/<scope>/<name>``, owned by the origin's
    agent session)."""

    node_id: str
    session_id: str  # one publish session
    start_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "node_id": self.node_id,
                             "session_id": self.session_id, "start_ms": self.start_ms})

    @classmethod
    def from_json(cls, data: bytes) -> "StreamRecord":
        doc = _load(data)
        try:
            return cls(str(doc["node_id"]), str(doc["session_id"]), int(doc["start_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"bad stream record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Reservation:
    """A broadcast lookup's claim on an origin for a stream that is not live yet."""

    node_id: str
    expires_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "node_id": self.node_id, "expires_ms": self.expires_ms})

    @classmethod
    def from_json(cls, data: bytes) -> "Reservation":
        doc = _load(data)
        try:
            return cls(str(doc["node_id"]), int(doc["expires_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"bad reservation: {exc}") from exc


def _load(data: bytes) -> dict:
    try:
        doc = orjson.loads(data)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"record is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RecordError("record is not a JSON object")
    schema = doc.get("schema")
    if schema != SCHEMA_VERSION:
        raise RecordError(f"unsupported record schema {schema!r} (this build reads {SCHEMA_VERSION})")
    return doc
