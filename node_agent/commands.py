"""The agent's command channel: commands queued for this node in ZooKeeper (``streammanager.commands``).

Contract: a ``ChildrenWatch`` on ``commands/<node_id>`` (plus a poll every few seconds, in case a
watch is lost with a session) wakes one worker thread, which runs the queued commands in sequence
order through a registry of handlers (name -> callable taking the command's args) and deletes each
when its handler returned, raised, or when the command was unknown or expired. Handlers must be
idempotent: a command can run twice if the agent dies between running and deleting it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch

from streammanager.commands import Command
from streammanager.models import RecordError
from streammanager.registry import ZkPaths, now_ms

log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], None]
POLL_S = 5.0


class CommandWatcher:
    def __init__(self, client: KazooClient, paths: ZkPaths, node_id: str, handlers: Mapping[str, Handler]):
        self._client = client
        self._path = paths.node_commands(node_id)
        self._node_id = node_id
        self._handlers = dict(handlers)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agent-commands", daemon=True)
        self.handled = 0

    def start(self) -> None:
        self._client.retry(self._client.ensure_path, self._path)
        ChildrenWatch(self._client, self._path, self._on_children)
        self._thread.start()

    def stop(self) -> None:
        """Never waits long: a command in progress on an unreachable ZooKeeper is abandoned (it
        stays queued, and expires)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def _on_children(self, children: list[str]) -> bool:
        if children:
            self._wake.set()
        return not self._stopping.is_set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            if not self._client.connected:
                continue  # the watch fires again after the reconnection; the poll covers the rest
            try:
                self.run_pending()
            except (KazooException, self._client.handler.timeout_exception) as exc:
                log.warning("could not read commands: %s", exc, extra={"node_id": self._node_id})
                self._stopping.wait(1.0)
                self._wake.set()

    def run_pending(self) -> int:
        """Run every queued command in order; returns how many ran."""
        try:
            names = sorted(self._client.retry(self._client.get_children, self._path))
        except NoNodeError:
            self._client.retry(self._client.ensure_path, self._path)
            return 0
        ran = 0
        for name in names:
            if self._stopping.is_set():
                break
            path = f"{self._path}/{name}"
            try:
                data, _ = self._client.retry(self._client.get, path)
            except NoNodeError:
                continue
            self._run(path, data)
            ran += 1
            try:
                self._client.retry(self._client.delete, path)
            except NoNodeError:
                pass
        return ran

    def _run(self, path: str, data: bytes) -> None:
        extra = {"node_id": self._node_id}
        try:
            command = Command.from_json(data)
        except RecordError as exc:
            log.error("dropping an undecodable command %s: %s", path, exc, extra=extra)
            return
        extra["action"] = command.name
        if command.expired(now_ms()):
            log.warning("dropping an expired command %s", command.name, extra=extra)
            return
        handler = self._handlers.get(command.name)
        if handler is None:
            log.error("dropping an unknown command %r", command.name[:40], extra=extra)
            return
        try:
            handler(command.args)
            self.handled += 1
            log.info("command %s done", command.name, extra=extra)
        except Exception:
            log.exception("command %s failed", command.name, extra=extra)
