"""Commands to node agents through ZooKeeper (the sending side).

Layout: ``<root>/v1/commands/<node_id>/cmd-<seq>``, persistent and sequential, one :class:`Command`
each. The node's agent watches its own command node, runs each command in sequence order, and deletes
it when done (also when it failed, was unknown or had expired). A sender that needs to know waits for
the deletion (:func:`wait_consumed`) and withdraws a command nobody took (:func:`withdraw`).

Commands: ``close`` (args ``channel``, ``session``: a session id or ``*``) drops the publisher of a
channel at its origin; ``drain`` puts a node into the draining state at once (idempotent).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from streammanager.models import SCHEMA_VERSION, RecordError
from streammanager.registry import ZkPaths, now_ms

COMMAND_CLOSE = "close"
COMMAND_DRAIN = "drain"
DEFAULT_TTL_S = 60.0


@dataclass(frozen=True)
class Command:
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    command_id: str = ""
    created_ms: int = 0
    expires_ms: int = 0  # an agent drops a command it finds after this (0: never)

    def expired(self, now: int) -> bool:
        return bool(self.expires_ms) and now > self.expires_ms

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "name": self.name, "args": dict(self.args),
                             "command_id": self.command_id, "created_ms": self.created_ms,
                             "expires_ms": self.expires_ms})

    @classmethod
    def from_json(cls, data: bytes) -> "Command":
        try:
            doc = orjson.loads(data)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"command is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
            raise RecordError(f"command is not a schema {SCHEMA_VERSION} JSON object")
        try:
            args = doc.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
            return cls(str(doc["name"]), args, str(doc.get("command_id", "")), int(doc.get("created_ms", 0)),
                       int(doc.get("expires_ms", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"bad command: {exc}") from exc


def send_command(client: KazooClient, paths: ZkPaths, node_id: str, name: str, *, ttl_s: float = DEFAULT_TTL_S,
                 **args: Any) -> str:
    """Queue command ``name`` with ``args`` (JSON values) for ``node_id``; returns its znode path.

    Safe to call from any process holding a started client (the controller, an API worker). A create
    retried after a lost connection may queue the command twice: every command is idempotent."""
    created = now_ms()
    command = Command(name, args, uuid.uuid4().hex, created, created + int(ttl_s * 1000))
    return client.retry(client.create, paths.node_command(node_id), command.to_json(), sequence=True,
                        makepath=True)


def wait_consumed(client: KazooClient, path: str, timeout_s: float) -> bool:
    """Wait until the command at ``path`` was deleted by its agent; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        changed = threading.Event()
        if client.exists(path, watch=lambda event: changed.set()) is None:
            return True
        left = deadline - time.monotonic()
        if left <= 0 or not changed.wait(left):
            return client.exists(path) is None


def withdraw(client: KazooClient, path: str) -> bool:
    """Delete a command nobody took. True if it was still queued (so it will never run)."""
    try:
        client.retry(client.delete, path)
        return True
    except NoNodeError:
        return False
