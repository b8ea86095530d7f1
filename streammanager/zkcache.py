"""A watch-driven copy of one znode's children and their data: kazoo's ``TreeCache``, one level deep
and lighter.

Why not ``TreeCache`` itself: every change it sees crosses four threads (the connection loop, kazoo's
callback thread, the cache's own background thread twice) and keeps a copy of the raw data. In an API
worker at a thousand nodes, that machinery cost several times our own decoding, and its threads
competing for the GIL with request threads tripled the lookup tail (``make bench``). Here a change
costs one watch callback (which only sends the read) and one completion, where the listener runs.

Ordering: every read is sent on the one client connection and every completion runs on kazoo's single
completion thread, so ``on_change`` sees each child's states in ZooKeeper's order and from one thread.

Kazoo drops all watches whenever the connection is lost (it does not send ``SetWatches``), so each
(re)connection starts a full resynchronisation: list the children with a watch, read every one with a
watch, and report children that disappeared meanwhile as removed. While disconnected, the copy keeps
its last content.
"""
from __future__ import annotations

import logging
from typing import Callable

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import EventType, WatchedEvent

log = logging.getLogger(__name__)

# on_change(child name, data or None when the child is gone)
ChangeListener = Callable[[str, "bytes | None"], None]


class KnownChildren:
    """The children a listener has been told of, and the one way to tell it more: the removal of a
    child it never had is not reported, and a failing listener is logged without stopping the source."""

    def __init__(self, on_change: ChangeListener, source: str, known: set[str] | None = None):
        self._on_change = on_change
        self._source = source
        self.names: set[str] = set(known or ())

    def report(self, name: str, data: bytes | None) -> None:
        if data is None:
            if name not in self.names:
                return
            self.names.discard(name)
        else:
            self.names.add(name)
        try:
            self._on_change(name, data)
        except Exception:  # a listener bug must not stop the source
            log.exception("listener failed on %s/%s", self._source, name)

    def remove_missing(self, present: set[str]) -> None:
        """Report every known child that is not in ``present`` removed."""
        for name in self.names - present:
            self.report(name, None)


class ChildrenDataCache:
    """Calls ``on_change(name, data)`` for every child of ``path`` as it appears or changes, and
    ``on_change(name, None)`` when it goes; ``on_initialized()`` once, when the first full read is done;
    ``on_synced()`` after every full read (the first, and each resynchronisation after a reconnection)."""

    def __init__(self, client: KazooClient, path: str, on_change: ChangeListener,
                 on_initialized: Callable[[], None] = lambda: None, known: set[str] | None = None,
                 on_synced: Callable[[], None] = lambda: None):
        """``known``: children the listener already has (from an earlier source); those missing from
        the first listing are reported removed."""
        self._client = client
        self._path = path.rstrip("/")
        self._on_initialized = on_initialized
        self._on_synced = on_synced
        # Touched on kazoo's completion thread only:
        self._known = KnownChildren(on_change, self._path, known)  # children reported present
        self._sync = 0  # the latest full listing; reads of the first sync count down until loaded
        self._pending: set[str] = set()  # the latest full listing's children not read yet
        self._initialized = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin (the client must be started); every later reconnection resynchronises by itself."""
        self._client.add_listener(self._on_state)
        self._list(full=True)

    def close(self) -> None:
        self._closed = True
        self._client.remove_listener(self._on_state)

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def known(self) -> set[str]:
        """Children reported present (read it on the completion thread, or after ``close``)."""
        return set(self._known.names)

    def _on_state(self, state: str) -> None:
        # Called on kazoo's connection thread: queue the work, never wait on ZooKeeper there.
        if state == KazooState.CONNECTED and not self._closed:
            self._client.handler.callback_queue.put(lambda: self._list(full=True))

    # -- children --------------------------------------------------------------------------------
    def _list(self, full: bool = False) -> None:
        if self._closed:
            return
        try:
            result = self._client.get_children_async(self._path, watch=self._on_children_event)
        except KazooException as exc:  # closed meanwhile
            log.debug("cannot list %s now: %s", self._path, exc)
            return
        result.rawlink(lambda res: self._children_listed(res, full))

    def _on_children_event(self, event: WatchedEvent) -> None:
        if event.type in (EventType.CHILD, EventType.CREATED, EventType.DELETED):
            self._list()

    def _children_listed(self, result, full: bool) -> None:
        """On the completion thread: read new children (every child on a full listing), drop gone ones."""
        if self._closed:
            return
        try:
            children = set(result.get_nowait())
        except NoNodeError:
            # the parent does not exist (yet): a watch on its existence brings us back
            try:
                self._client.exists_async(self._path, watch=self._on_children_event)
            except KazooException:
                pass
            children = set()
        except Exception as exc:  # connection lost mid-call: the reconnection lists again
            log.debug("listing %s failed: %s", self._path, exc)
            return
        self._known.remove_missing(children)
        to_read = children if full else children - self._known.names
        if full:
            self._sync += 1
            self._pending = set(to_read)
            if not to_read:
                self._mark_synced()
        for name in to_read:
            self._read(name, self._sync)

    # -- data ------------------------------------------------------------------------------------
    def _read(self, name: str, sync: int | None = None) -> None:
        if self._closed:
            return
        try:
            result = self._client.get_async(f"{self._path}/{name}", watch=self._on_data_event)
        except KazooException as exc:
            log.debug("cannot read %s now: %s", name, exc)
            return
        result.rawlink(lambda res: self._data_read(name, res, sync))

    def _on_data_event(self, event: WatchedEvent) -> None:
        if event.path is None or event.type == EventType.NONE:
            return  # the session's watches were reset: the reconnection lists again
        self._read(event.path.rsplit("/", 1)[1])

    def _data_read(self, name: str, result, sync: int | None) -> None:
        """On the completion thread: report the child's data, or its removal."""
        if self._closed:
            return
        try:
            data, _stat = result.get_nowait()
        except NoNodeError:
            data = None
        except Exception as exc:  # connection lost mid-call: the reconnection lists again
            log.debug("reading %s failed: %s", name, exc)
            return
        self._known.report(name, data)
        if sync is not None and sync == self._sync and name in self._pending:
            self._pending.discard(name)
            if not self._pending:
                self._mark_synced()

    def _mark_synced(self) -> None:
        if not self._initialized:
            self._initialized = True
            try:
                self._on_initialized()
            except Exception:
                log.exception("cache initialisation listener failed on %s", self._path)
        try:
            self._on_synced()
        except Exception:
            log.exception("cache sync listener failed on %s", self._path)
