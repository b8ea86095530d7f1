"""The ZooKeeper registry: znode paths, the watch-driven view the API answers from, and the writes.

Layout (root configurable, default ``/streammanager``)::

    <root>/v1/nodes/<node_id>                ephemeral node record (NodeRecord)
    <root>/v1/streams/<scope>/<stream>       ephemeral stream ownership (StreamRecord), origin's session
    <root>/v1/reservations/<scope>/<stream>  broadcast reservation (Reservation; persistent, until it expires)

The view caches node records only (a one-level watch cache over ``nodes``, see zkcache.py) and derives
the stream index from them in memory: per-stream znodes exist for ownership, never for lookups (see
FACTS.md for why).
"""
from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote, unquote

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import BadVersionError, ConnectionLoss, NodeExistsError, NoNodeError, NotEmptyError
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from streammanager.models import (
    ROLE_ORIGIN,
    NodeRecord,
    RecordError,
    StreamKey,
    StreamRecord,
    validate_name,
)
from streammanager.feed import FeedCache, FeedLost
from streammanager.selection import Candidate
from streammanager.zkcache import ChildrenDataCache

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class ZkPaths:
    """Every znode path is built here."""

    def __init__(self, root: str = "/streammanager"):
        root = "/" + root.strip("/")
        self.base = f"{root}/v1"
        self.nodes = f"{self.base}/nodes"
        self.streams = f"{self.base}/streams"
        self.reservations = f"{self.base}/reservations"
        self.groups = f"{self.base}/groups"
        self.instances = f"{self.base}/instances"
        self.election = f"{self.base}/controller/election"
        self.callbacks = f"{self.base}/callbacks"
        self.commands = f"{self.base}/commands"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}/{quote(node_id, safe='')}"

    def stream(self, key: StreamKey) -> str:
        return f"{self.streams}/{quote(key.scope, safe='')}/{quote(key.name, safe='')}"

    def reservation(self, key: StreamKey) -> str:
        return f"{self.reservations}/{quote(key.scope, safe='')}/{quote(key.name, safe='')}"

    def group(self, name: str) -> str:
        return f"{self.groups}/{quote(name, safe='')}"

    def instance(self, instance_id: str) -> str:
        return f"{self.instances}/{quote(instance_id, safe='')}"

    def node_commands(self, node_id: str) -> str:
        return f"{self.commands}/{quote(node_id, safe='')}"

    def node_command(self, node_id: str, name: str = "cmd-") -> str:
        """One command to a node (``cmd-`` is the prefix of a sequential create)."""
        return f"{self.node_commands(node_id)}/{name}"

    # the durable callback queue: events per channel in znode (sequence) order, and the open
    # publish sessions whose stream-closed is still owed
    @property
    def callback_queue(self) -> str:
        return f"{self.callbacks}/queue"

    def callback_channel(self, channel: str) -> str:
        return f"{self.callback_queue}/{quote(channel, safe='')}"

    def callback_event(self, channel: str, name: str = "ev-") -> str:
        """One queued event (``ev-`` is the prefix of a sequential create)."""
        return f"{self.callback_channel(channel)}/{name}"

    @property
    def callback_sessions(self) -> str:
        return f"{self.callbacks}/sessions"

    def callback_session(self, channel: str, session_id: str) -> str:
        return f"{self.callback_sessions}/{quote(channel, safe='')}@{quote(session_id, safe='')}"

    # sessions the reaper closed for their origin (stream-closed sent on its behalf): an origin that
    # comes back finds out here that the application was told its session is over
    @property
    def callback_reaped(self) -> str:
        return f"{self.callbacks}/reaped"

    def callback_reaped_session(self, channel: str, session_id: str) -> str:
        return f"{self.callback_reaped}/{quote(channel, safe='')}@{quote(session_id, safe='')}"

    @staticmethod
    def decode(segment: str) -> str:
        return unquote(segment)


class PollingHandler(SequentialThreadingHandler):
    """kazoo's threading handler, waiting on its sockets with one ``poll`` call.

    kazoo's own ``select`` builds an epoll selector for every wait (five system calls and a Python
    object per loop turn); its connection loop turns three times per watched change, and at a
    thousand nodes that loop was the largest cost of keeping the registry view current.
    """

    def select(self, rlist, wlist, xlist, timeout=None):
        poller = select.poll()
        masks: dict[int, int] = {}
        objects: dict[int, list] = {}
        for items, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for obj in items:
                fd = obj if isinstance(obj, int) else obj.fileno()
                if fd < 0:
                    raise ValueError("invalid file descriptor")
                masks[fd] = masks.get(fd, 0) | mask
                objects.setdefault(fd, []).append((obj, mask))
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ready = poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        readable, writable = [], []
        for fd, events in ready:
            for obj, mask in objects.get(fd, ()):
                if mask == select.POLLIN and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    readable.append(obj)
                elif mask == select.POLLOUT and events & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    writable.append(obj)
        return readable, writable, []


def make_client(hosts: str, timeout_s: float = 4.0, auth: str | None = None) -> KazooClient:
    """A client that reconnects forever (even to an ensemble that lost its data: :class:`ZxidGuard`)
    and retries each command a few times.

    With ``auth`` (``USER:PASSWORD``, the cluster's identity: ``SM_ZK_AUTH`` / ``AGENT_ZK_AUTH``) it
    authenticates with ZooKeeper's digest scheme on every connection, and every znode it creates can be
    read and written by that identity only: without it, anyone who reaches ZooKeeper reads the registry
    and can write node groups (whose boot scripts run as root on new nodes), node records (where lookups
    send publishers and viewers) and commands."""
    acl = {}
    if auth:
        user, _, password = auth.partition(":")
        acl = {"auth_data": [("digest", auth)], "default_acl": [make_digest_acl(user, password, all=True)]}
    client = KazooClient(
        hosts=hosts,
        handler=PollingHandler(),
        timeout=timeout_s,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=2.0),
        command_retry=KazooRetry(max_tries=5, delay=0.1, max_delay=1.0),
        **acl,
    )
    ZxidGuard(client, max(5.0, 2 * timeout_s))
    return client


def connect(client: KazooClient, timeout_s: float, stop: threading.Event | None = None) -> bool:
    """Start ``client`` and wait until it is connected: True. False if ``stop`` is set first. Raises the
    handler's timeout exception (kazoo's KazooTimeoutError) after ``timeout_s``, the client then stopped
    and closed, as kazoo's ``start(timeout)`` does; that one also held a SIGTERM for its whole timeout."""
    connected = client.start_async()
    deadline = time.monotonic() + timeout_s
    while True:
        if connected.wait(0.2) and client.connected:
            return True
        if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
            client.stop()
            client.close()
            if stop is not None and stop.is_set():
                return False
            raise client.handler.timeout_exception("Connection time-out")
        if connected.is_set():  # connected, and lost again at once: look again shortly, not in a busy loop
            time.sleep(0.2)


class ZxidGuard:
    """Lets a client back into an ensemble whose history is behind what the client saw.

    A ZooKeeper server refuses a client that has seen a later transaction than its own (the client
    must not travel back in time), and kazoo keeps the last transaction id it saw across reconnects.
    After an ensemble restarts with its data lost (or restored from an older backup), every agent and
    API worker was refused until new writes carried the ensemble past what each had seen: in a busy
    cluster as good as never, with agents unregistered and the API answering from an old view. So after
    ``after_s`` without a connection the id is forgotten: a server that still knows the session resumes
    it; one that does not expires it, and the client starts a new session (agents register again and
    claim their streams, views reload). The cost: a client away that long may read from a server a
    little behind what it saw before, as a new client may.
    """

    def __init__(self, client: KazooClient, after_s: float):
        self._client = client
        self._after_s = after_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        client.add_listener(self._on_state)

    def _on_state(self, state: str) -> None:
        with self._lock:
            if state == KazooState.CONNECTED:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            elif self._timer is None:
                self._timer = threading.Timer(self._after_s, self._forget)
                self._timer.daemon = True
                self._timer.start()

    def _forget(self) -> None:
        with self._lock:
            self._timer = None
            client = self._client
            if client.connected or not client.last_zxid:
                return
            if getattr(client, "_stopped", None) is not None and client._stopped.is_set():
                return  # stopped on purpose
            log.warning("ZooKeeper has not taken this client back for %.0f s: forgetting the last transaction "
                        "it saw (%#x), in case the ensemble lost its data", self._after_s, client.last_zxid)
            client.last_zxid = 0


@dataclass(frozen=True, slots=True)
class LiveStream:
    """A live stream as the API reports it: its origin and its audience on every carrying node."""

    key: StreamKey
    origin: NodeRecord
    start_ms: int
    subscribers: int


FEED_RETRY_S = 2.0  # a view watching ZooKeeper by itself looks for the host's feed this often
FEED_RETRY_MAX_S = 30.0  # ... backing off to this while a feed is there but does not answer
FEED_CATCH_UP_S = 15.0  # how long a feed may take to send the whole registry before it is given up


class RegistryView:
    """An in-memory, watch-driven view of every node record, with the stream index derived from it.

    Start it once per process (after any fork). Reads never touch ZooKeeper. The view is written by
    kazoo's single completion thread; readers get immutable tuples and records, so they need no lock.
    When the connection is lost the view keeps its last content; :meth:`age_ms` says how old it is, and
    the cache reads everything again when the client reconnects.
    """

    def __init__(self, client: KazooClient, paths: ZkPaths, feed_socket: str | None = None):
        self._client = client
        self._paths = paths
        self._feed_socket = feed_socket  # the host's registry feed (streammanager.feed), if any
        self._feed: FeedCache | None = None  # while the view is fed by it
        self._cache: ChildrenDataCache | None = None
        self._nodes: dict[str, Candidate] = {}
        self._slice_members: dict[tuple[str, str], dict[str, Candidate]] = {}
        self._by_role_region: dict[tuple[str, str], tuple[Candidate, ...]] = {}
        self._by_role: dict[str, tuple[int, tuple[Candidate, ...]]] = {}  # role -> (version, nodes)
        self._version = 0  # grows with every applied change
        self._regions: dict[str, tuple[str, ...]] = {}
        self._origin_of: dict[str, str] = {}  # "scope/name" -> origin node id publishing it
        self._carriers: dict[str, tuple[str, ...]] = {}  # "scope/name" -> node ids carrying it
        self._initialized = threading.Event()
        self._loaded = False
        self._closed = threading.Event()
        self._starter: threading.Thread | None = None
        self._retry_lock = threading.Lock()
        self._retrying = False  # a thread looks for the feed to come back
        self._connected = False
        self._disconnected_since_ms: int | None = now_ms()
        self._lost_since_ms: int | None = None  # set while a connection logged as lost is not back
        self.decode_errors = 0  # node records dropped because they did not decode
        self.changes_at_load: int | None = None  # ``changes`` when the view was first loaded
        # nodes registered (their agent's znode exists) whose record this build cannot use: a newer or
        # older agent's during an upgrade, or a damaged one. Lookups skip them; they are not dead.
        self._unreadable: frozenset[str] = frozenset()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (retrying until ZooKeeper answers) and load the view, in the background."""
        self._client.add_listener(self._on_state)
        self._starter = threading.Thread(target=self._connect_and_load, name="registry-start", daemon=True)
        self._starter.start()

    def _connect_and_load(self, use_feed: bool = True) -> None:
        if self._feed_socket and use_feed:
            feed = FeedCache(self._feed_socket, self._on_change, self._on_initialized, self._on_feed_state,
                             self._on_feed_lost)
            self._feed = feed  # before start: the feed may deliver everything at once
            try:
                feed.start()
                log.info("registry view fed by %s", self._feed_socket)
            except OSError as exc:
                self._feed = None
                log.warning("no registry feed at %s (%s): watching ZooKeeper directly", self._feed_socket, exc)
                self._return_to_feed_later()
        while not self._closed.is_set():
            try:
                if not self._client.connected:
                    self._client.start(timeout=5.0)
                if self._feed is not None:
                    return  # the client is for writes (reservations); the feed brings the records
                self._on_state(KazooState.CONNECTED)
                self._watch_directly()
                return
            except Exception as exc:  # kazoo raises its own timeout types, not all KazooException
                log.warning("registry not reachable yet (%s): retrying", exc)
                self._closed.wait(1.0)

    def _watch_directly(self, known: set[str] | None = None) -> None:
        cache = ChildrenDataCache(self._client, self._paths.nodes, self._on_change, self._on_initialized,
                                  known=known)
        cache.start()
        self._cache = cache

    def _on_feed_state(self, connected: bool, since_ms: int | None) -> None:
        lost_since = self._lost_since_ms
        self._connected = connected
        self._disconnected_since_ms = since_ms
        if not connected:
            log.warning("the registry feed lost ZooKeeper: answering from the last view")
            self._lost_since_ms = lost_since or since_ms or now_ms()
        elif lost_since is not None:
            self._log_back("the registry feed has ZooKeeper again", lost_since)

    def _log_back(self, what: str, lost_since_ms: int) -> None:
        """Say that the connection lost (and logged as lost) is back: without this line, the last word of
        an outage in the log was that the view was answering from its last content."""
        self._lost_since_ms = None
        log.info("%s after %.1f s: the view is current", what, max(0, now_ms() - lost_since_ms) / 1000)

    def _on_feed_lost(self) -> None:
        """On the feed's reader thread, after its last change: watch ZooKeeper from here on, starting
        from the records the feed reported (so that any removed meanwhile are reported removed)."""
        feed, self._feed = self._feed, None
        if self._closed.is_set() or feed is None:
            return
        self._on_state(KazooState.CONNECTED if self._client.connected else KazooState.SUSPENDED)
        try:
            self._watch_directly(known=feed.known)
        except Exception:  # not connected now: the starter's loop below retries
            log.exception("cannot watch the registry directly yet")
            self._starter = threading.Thread(target=partial(self._connect_and_load, use_feed=False),
                                             name="registry-start", daemon=True)
            self._starter.start()
        self._return_to_feed_later()

    # -- back to the feed ------------------------------------------------------------------------
    def _return_to_feed_later(self) -> None:
        """Watching ZooKeeper by itself costs every worker what the feed does once for the host
        (``serve`` starts a feed that exits again): look for a feed until one answers."""
        with self._retry_lock:
            if self._retrying or self._closed.is_set():
                return
            self._retrying = True
        threading.Thread(target=self._look_for_feed, name="registry-feed-retry", daemon=True).start()

    def _look_for_feed(self) -> None:
        delay = FEED_RETRY_S
        try:
            while not self._closed.wait(delay):
                if self._cache is None or self._feed is not None or not os.path.exists(self._feed_socket):
                    delay = FEED_RETRY_S  # not watching yet (ZooKeeper away), or no feed yet: look again soon
                    continue
                feed = FeedCache(self._feed_socket, self._on_change, self._on_initialized, self._on_feed_state,
                                 self._on_feed_lost)
                try:
                    feed.connect()
                except OSError:  # the socket of a feed that exited: the next one replaces it
                    feed.discard()
                    delay = FEED_RETRY_S
                    continue
                try:
                    feed.catch_up(FEED_CATCH_UP_S)
                except (OSError, FeedLost, ValueError, struct.error) as exc:
                    feed.discard()
                    delay = min(2 * delay, FEED_RETRY_MAX_S)  # a feed that is there but does not answer
                    log.info("the registry feed does not answer (%s): watching ZooKeeper directly, trying it "
                             "again in %.0f s", exc, delay)
                    continue
                with self._retry_lock:
                    self._retrying = False
                # the switch runs where the direct watch delivers, so that the view has one writer
                self._client.handler.callback_queue.put(partial(self._switch_to_feed, feed))
                return
        finally:
            with self._retry_lock:
                self._retrying = False

    def _switch_to_feed(self, feed: FeedCache, present: set[str] | None = None) -> None:
        """On kazoo's completion thread (the direct watch's): stop watching, then let the feed bring
        every record from the state it caught up with.

        The feed's snapshot is older than what the direct watch delivered meanwhile: a node that arrived
        in between is missing from it (the feed's next batch brings it). So the nodes the view has and the
        snapshot lacks are asked of ZooKeeper first (asynchronously: the answers come back on this thread);
        only those gone there are reported removed. ``present``: the nodes so confirmed."""
        cache = self._cache
        if self._closed.is_set() or self._feed is not None or cache is None:
            feed.discard()
            if not self._closed.is_set() and self._feed is None:
                self._return_to_feed_later()
            return
        if present is None:
            missing = cache.known - feed.caught_up_names()
            if missing:
                left, found = set(missing), set()

                def answered(name, result):
                    try:
                        if result.get_nowait() is not None:
                            found.add(name)
                    except Exception:  # no answer: treated as gone, as the snapshot says
                        pass
                    left.discard(name)
                    if not left:
                        self._switch_to_feed(feed, found)
                try:
                    for name in missing:
                        self._client.exists_async(self._paths.node(name)).rawlink(partial(answered, name))
                    return
                except Exception:  # not connected: the snapshot decides, as before
                    pass
            present = set()
        cache.close()  # its later completions, queued behind this one, find it closed
        self._cache = None
        self._feed = feed
        feed.resume(cache.known, keep=present)
        log.info("registry view fed by %s again", self._feed_socket)

    def wait_initialized(self, timeout_s: float) -> bool:
        return self._initialized.wait(timeout_s)

    def close(self) -> None:
        self._closed.set()
        if self._feed is not None:
            self._feed.close()
        if self._cache is not None:
            self._cache.close()
        self._client.remove_listener(self._on_state)

    # -- connection state ------------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        if self._feed is not None:
            return  # the feed reports its own connection, which is the one the records come through
        if state == KazooState.CONNECTED:
            self._connected = True
            self._disconnected_since_ms = None
            if self._lost_since_ms is not None:
                self._log_back("registry connection back", self._lost_since_ms)
        else:
            self._connected = False
            if self._disconnected_since_ms is None:
                self._disconnected_since_ms = now_ms()
            if self._lost_since_ms is None:
                self._lost_since_ms = self._disconnected_since_ms
            log.warning("registry connection %s: answering from the last view", state.lower())

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def source(self) -> str:
        """Where the records come from: ``feed`` (the host's registry feed) or ``zookeeper`` (watched
        by this process)."""
        return "feed" if self._feed is not None else "zookeeper"

    @property
    def initialized(self) -> bool:
        return self._loaded  # every lookup asks: a plain attribute, set with the event

    def age_ms(self, now: int | None = None) -> int:
        """How stale the view may be: 0 while connected, else the time since the connection went."""
        since = self._disconnected_since_ms
        if since is None:
            return 0
        return max(0, (now if now is not None else now_ms()) - since)

    # -- cache events (single thread) ------------------------------------------------------------
    def _on_initialized(self) -> None:
        if self._loaded:
            return  # a later source (the direct watch after the feed) loaded again what the view has
        self.changes_at_load = self._version
        self._loaded = True
        self._initialized.set()
        log.info("registry view initialised: %d nodes, %d live streams", len(self._nodes), len(self._origin_of))

    def _on_change(self, name: str, data: bytes | None) -> None:
        node_id = ZkPaths.decode(name)
        if data is None:
            self._readable(node_id)
            self._apply(node_id, None)
            return
        previous = self._nodes.get(node_id)
        try:
            record = NodeRecord.from_json(data, previous.node if previous else None)
        except RecordError as exc:
            self.decode_errors += 1
            log.warning("ignoring node record %s: %s", node_id, exc)
            self._unreadable = self._unreadable | {node_id}
            self._apply(node_id, None)
            return
        if record.id != node_id:
            self.decode_errors += 1
            log.warning("ignoring node record %s: it names itself %s", node_id, record.id)
            self._unreadable = self._unreadable | {node_id}
            self._apply(node_id, None)  # what it said before is no more to be trusted than what it says now
            return
        if previous is None:  # a new node: its id must be one the API takes (agents check theirs at start)
            try:
                validate_name("node", node_id)
            except RecordError as exc:
                self.decode_errors += 1
                log.warning("ignoring node record %r: %s", node_id[:80], exc)
                return
        self._readable(node_id)
        if previous is not None and previous.node.updated_ms == record.updated_ms and previous.node == record:
            # the record the view has, read again (a new source's first read: the direct watch after the
            # feed went, the feed again after it): no change. Counted, each switch made
            # sm_view_changes_total jump by the registry's size, as a worker's first load did
            return
        self._apply(node_id, record)

    def _readable(self, node_id: str) -> None:
        if node_id in self._unreadable:
            self._unreadable = self._unreadable - {node_id}

    def _apply(self, node_id: str, record: NodeRecord | None) -> None:
        """Update the indexes for one node, touching only what changed: a node reports every second
        or two, and at a thousand nodes a rescan per report would eat the API's CPU."""
        old = self._nodes.get(node_id)
        old_node = old.node if old else None
        if old_node is None and record is None:
            return
        if record is None:
            self._nodes.pop(node_id, None)
        else:
            self._nodes[node_id] = Candidate.of(record)
        # role/region slices: copy-on-write tuples, rebuilt from the slice's own members only
        slices = set()
        if old_node is not None:
            slices.add((old_node.role, old_node.region))
            self._slice_members.get((old_node.role, old_node.region), {}).pop(node_id, None)
        if record is not None:
            slices.add((record.role, record.region))
            self._slice_members.setdefault((record.role, record.region), {})[node_id] = self._nodes[node_id]
        for sl in slices:
            members = self._slice_members.get(sl)
            if members:
                self._by_role_region[sl] = tuple(members.values())
            else:
                self._slice_members.pop(sl, None)
                self._by_role_region.pop(sl, None)
        if old_node is None or record is None or (old_node.role, old_node.region) != (record.role, record.region):
            for role in {r for r, _ in slices}:
                self._regions[role] = tuple(sorted(reg for r, reg in self._slice_members if r == role))
        self._version += 1
        # the stream index: carriers change when a stream appears or leaves; the origin mapping also
        # when an origin's publishing state of a stream changes
        old_streams = old_node.streams if old_node else {}
        new_streams = record.streams if record else {}
        is_origin = (record or old_node).role == ROLE_ORIGIN
        if old_streams.keys() != new_streams.keys():  # most reports change counts, not the set of streams
            for key in old_streams.keys() - new_streams.keys():
                self._drop_carrier(key, node_id)
            for key in new_streams.keys() - old_streams.keys():
                carriers = self._carriers.get(key, ())
                if node_id not in carriers:
                    self._carriers[key] = carriers + (node_id,)
                if is_origin:
                    self._reindex_origin(key)
        if old_node is not None and record is not None and old_node.role != record.role:
            for key in old_streams.keys() | new_streams.keys():  # an origin's streams are no more its own
                self._reindex_origin(key)
        elif is_origin and old_streams and new_streams:
            for key, load in new_streams.items():
                before = old_streams.get(key)
                # an unchanged entry is the same object (NodeRecord.from_json keeps it): skipped at once
                if (before is not None and before is not load
                        and (before.publishing, before.start_ms) != (load.publishing, load.start_ms)):
                    self._reindex_origin(key)

    def _drop_carrier(self, key: str, node_id: str) -> None:
        carriers = tuple(n for n in self._carriers.get(key, ()) if n != node_id)
        if carriers:
            self._carriers[key] = carriers
        else:
            self._carriers.pop(key, None)
        if self._origin_of.get(key) == node_id or not carriers:
            self._reindex_origin(key)

    def _reindex_origin(self, key: str) -> None:
        best: tuple[int, str] | None = None
        for node_id in self._carriers.get(key, ()):
            cand = self._nodes.get(node_id)
            if cand is None or cand.node.role != ROLE_ORIGIN:
                continue
            load = cand.node.streams.get(key)
            if load is not None and load.publishing:
                rank = (load.start_ms, node_id)
                if best is None or rank < best:
                    best = rank
        if best is None:
            self._origin_of.pop(key, None)
        else:
            self._origin_of[key] = best[1]

    # -- reads (any thread, no ZooKeeper) --------------------------------------------------------
    def node(self, node_id: str) -> NodeRecord | None:
        cand = self._nodes.get(node_id)
        return cand.node if cand else None

    def nodes(self) -> list[NodeRecord]:
        return [c.node for c in list(self._nodes.values())]

    def candidates(self, role: str, region: str | None) -> tuple[Candidate, ...]:
        """Nodes of ``role`` in ``region`` (None: every region): an immutable snapshot."""
        if region is not None:
            return self._by_role_region.get((role, region), ())
        version = self._version
        cached = self._by_role.get(role)
        if cached is not None and cached[0] == version:
            return cached[1]
        # rebuilt lazily: only lookups without any region need every region's nodes
        everyone = tuple(c for (r, _), members in list(self._by_role_region.items()) if r == role
                         for c in members)
        self._by_role[role] = (version, everyone)
        return everyone

    def carriers(self, key: StreamKey | str, role: str) -> list[Candidate]:
        """Nodes of ``role`` that carry the stream now (``key``: a StreamKey or its ``scope/name``)."""
        ids = self._carriers.get(key if isinstance(key, str) else str(key))
        if not ids:
            return []
        return [c for c in map(self._nodes.get, ids) if c is not None and c.role == role]

    def regions(self, role: str) -> tuple[str, ...]:
        return self._regions.get(role, ())

    def all_regions(self) -> set[str]:
        return {c.node.region for c in list(self._nodes.values())}

    def origin_of(self, key: StreamKey | str) -> NodeRecord | None:
        """The node publishing the stream (``key``: a StreamKey or its ``scope/name``), if it is live."""
        node_id = self._origin_of.get(key if isinstance(key, str) else str(key))
        return self.node(node_id) if node_id else None

    def live_stream(self, key: StreamKey) -> LiveStream | None:
        return self._live_stream(str(key), key)

    def _live_stream(self, skey: str, key: StreamKey) -> LiveStream | None:
        origin_id = self._origin_of.get(skey)
        origin = self._nodes.get(origin_id) if origin_id else None
        if origin is None:
            return None
        load = origin.node.streams.get(skey)
        subscribers = 0
        for node_id in self._carriers.get(skey, ()):
            cand = self._nodes.get(node_id)
            if cand is not None:
                carried = cand.node.streams.get(skey)
                if carried is not None:
                    subscribers += carried.subscribers
        return LiveStream(key, origin.node, load.start_ms if load else 0, subscribers)

    def live_streams(self) -> list[LiveStream]:
        """Every live stream, sorted by key. The keys were validated when their records were decoded."""
        out = []
        for skey in sorted(list(self._origin_of)):
            scope, _, name = skey.partition("/")
            stream = self._live_stream(skey, StreamKey(scope, name))
            if stream is not None:
                out.append(stream)
        return out

    def unreadable(self) -> frozenset[str]:
        """Ids of nodes that are registered but whose record does not decode (skipped by lookups):
        alive all the same, so the controller must not take them for dead."""
        return self._unreadable

    def node_count(self) -> int:
        return len(self._nodes)

    @property
    def changes(self) -> int:
        """Node record changes applied since the view started."""
        return self._version

    def stream_count(self) -> int:
        return len(self._origin_of)


UNREADABLE_CLAIM = StreamRecord("unknown", "unreadable", 0)  # a claim whose data does not decode


class StreamClaims:
    """Ownership of live streams by an origin's agent: one ephemeral znode per stream.

    ``claim`` is idempotent for the same session and refuses a stream owned by anyone else. Every call
    is bounded by ``timeout_s`` (a hook must never hang on an unreachable ZooKeeper): a call that does
    not complete in time raises ``ConnectionLoss``.
    """

    def __init__(self, client: KazooClient, paths: ZkPaths, timeout_s: float = 2.0):
        self._client = client
        self._paths = paths
        self._timeout_s = timeout_s

    def _call(self, method: str, *args, **kwargs):
        if not self._client.connected:
            raise ConnectionLoss("not connected to ZooKeeper")
        try:
            return getattr(self._client, method + "_async")(*args, **kwargs).get(timeout=self._timeout_s)
        except self._client.handler.timeout_exception:
            raise ConnectionLoss(f"ZooKeeper did not answer {method} within {self._timeout_s} s") from None

    def claim(self, key: StreamKey, record: StreamRecord) -> StreamRecord:
        """Create the stream's record; return the owner's record (ours, or the one already there)."""
        path = self._paths.stream(key)
        for _ in range(3):
            try:
                self._call("create", path, record.to_json(), ephemeral=True, makepath=True)
                return record
            except NodeExistsError:
                pass
            try:
                data, _ = self._call("get", path)
            except NoNodeError:  # released meanwhile: try again
                continue
            try:
                return StreamRecord.from_json(data)
            except RecordError:
                return UNREADABLE_CLAIM
        raise ConnectionLoss(f"could not settle the claim on {key}")

    def release(self, key: StreamKey, session_id: str) -> bool:
        """Delete the stream's record if this session owns it."""
        path = self._paths.stream(key)
        try:
            data, stat = self._call("get", path)
            if StreamRecord.from_json(data).session_id != session_id:
                return False
            self._call("delete", path, version=stat.version)
            return True
        except (NoNodeError, BadVersionError, RecordError):
            return False

    def owner(self, key: StreamKey) -> StreamRecord | None:
        """The stream's claim; None if there is none. A claim that does not decode (written by a newer
        agent during an upgrade, or damaged) is :data:`UNREADABLE_CLAIM`, as in :meth:`claim`: the
        stream is held by someone, so an edge must not turn its viewers away as "not live"."""
        try:
            data, _ = self._call("get", self._paths.stream(key))
        except NoNodeError:
            return None
        try:
            return StreamRecord.from_json(data)
        except RecordError:
            return UNREADABLE_CLAIM


def delete_children_twice_deep(client: KazooClient, parent: str, timeout_s: float = 10.0) -> int:
    """Delete every ``parent/<a>/<b>`` leaf (and emptied ``<a>``); return how many leaves went.

    Bounded: calls that fail for a lost connection are tried again until ``timeout_s`` has passed in
    all, then ``ConnectionLoss`` is raised (kazoo queues requests while it reconnects, so an unbounded
    retry waited as long as ZooKeeper was away, and the admin's request with it)."""
    deadline = time.monotonic() + timeout_s

    def call(method: str, path: str):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLoss(f"ZooKeeper did not answer within {timeout_s:g} s")
            try:
                return getattr(client, method + "_async")(path).get(timeout=remaining)
            except client.handler.timeout_exception:
                continue  # the deadline check above raises
            except ConnectionLoss:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    count = 0
    try:
        scopes = call("get_children", parent)
    except NoNodeError:
        return 0
    for scope in scopes:
        try:
            names = call("get_children", f"{parent}/{scope}")
        except NoNodeError:
            continue
        for name in names:
            try:
                call("delete", f"{parent}/{scope}/{name}")
                count += 1
            except NoNodeError:
                pass
            except NotEmptyError:  # not a record of ours (none has children): left alone, said so
                log.warning("not clearing %s/%s/%s: it has children (not a record this system writes)",
                            parent, scope, name)
        try:
            call("delete", f"{parent}/{scope}")
        except (NoNodeError, NotEmptyError):
            pass
    return count


def ensure_layout(client: KazooClient, paths: ZkPaths) -> None:
    for path in (paths.nodes, paths.streams, paths.reservations, paths.groups, paths.instances):
        client.retry(client.ensure_path, path)
