"""The one-level watch cache the registry view is built on, against the real ZooKeeper."""
from __future__ import annotations

import threading

import pytest

from streammanager.registry import make_client
from streammanager.zkcache import ChildrenDataCache
from tests.conftest import wait_until


class Mirror:
    """What a listener of the cache would hold: the children's data, and every call in order."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, bytes | None]] = []
        self.threads: set[str] = set()
        self.initialized = threading.Event()

    def on_change(self, name, data):
        self.calls.append((name, data))
        self.threads.add(threading.current_thread().name)
        if data is None:
            self.data.pop(name, None)
        else:
            self.data[name] = data


@pytest.fixture
def watcher(zookeeper):
    clients, caches = [], []

    def start(path):
        client = make_client(zookeeper.hosts)
        client.start(timeout=10)
        mirror = Mirror()
        cache = ChildrenDataCache(client, path, mirror.on_change, mirror.initialized.set)
        cache.start()
        clients.append(client)
        caches.append(cache)
        return mirror, cache, client

    yield start
    for cache in caches:
        cache.close()
    for client in clients:
        client.stop()
        client.close()


def test_the_first_sync_holds_every_existing_child_before_it_says_initialised(zk, zk_root, watcher):
    for i in range(300):
        zk.create(f"{zk_root}/n/c{i}", f"v{i}".encode(), makepath=True)
    mirror, cache, _ = watcher(f"{zk_root}/n")
    assert mirror.initialized.wait(10)
    # initialised means loaded: nothing missing at that moment
    assert len(mirror.data) == 300 and mirror.data["c7"] == b"v7"
    assert cache.initialized


def test_changes_creations_and_deletions_reach_the_listener_in_order(zk, zk_root, watcher):
    zk.create(f"{zk_root}/n/a", b"1", makepath=True)
    mirror, _, _ = watcher(f"{zk_root}/n")
    assert mirror.initialized.wait(10)
    for value in range(2, 40):
        zk.set(f"{zk_root}/n/a", str(value).encode())
    zk.create(f"{zk_root}/n/b", b"new")
    wait_until(lambda: mirror.data.get("a") == b"39" and mirror.data.get("b") == b"new", 5,
               what="the last write and the new child")
    values = [int(data) for name, data in mirror.calls if name == "a"]
    assert values == sorted(values)  # never an older value after a newer one
    zk.delete(f"{zk_root}/n/a")
    wait_until(lambda: "a" not in mirror.data, 5, what="the deletion")
    assert mirror.calls[-1] == ("a", None)
    assert len(mirror.threads) == 1  # one thread writes the listener's state: it needs no lock


def test_a_parent_created_later_is_picked_up(zk, zk_root, watcher):
    mirror, _, _ = watcher(f"{zk_root}/later")
    assert mirror.initialized.wait(10) and mirror.data == {}
    zk.create(f"{zk_root}/later/x", b"here", makepath=True)
    wait_until(lambda: mirror.data.get("x") == b"here", 5, what="a child under the new parent")


def test_a_new_session_resyncs_what_changed_while_the_old_one_was_gone(zk, zk_root, watcher):
    for name in ("stays", "changes", "goes"):
        zk.create(f"{zk_root}/n/{name}", b"before", makepath=True)
    mirror, _, client = watcher(f"{zk_root}/n")
    assert mirror.initialized.wait(10)
    client.stop()  # the cache's session ends; kazoo drops every watch with it
    zk.set(f"{zk_root}/n/changes", b"after")
    zk.delete(f"{zk_root}/n/goes")
    zk.create(f"{zk_root}/n/arrives", b"after")
    assert mirror.data["goes"] == b"before"  # while away, the last content stays
    client.start(timeout=10)
    wait_until(lambda: mirror.data == {"stays": b"before", "changes": b"after", "arrives": b"after"}, 5,
               what="the resync after the new session")
    # and the new session's watches work
    zk.set(f"{zk_root}/n/stays", b"later")
    wait_until(lambda: mirror.data["stays"] == b"later", 5, what="a change after the resync")


def test_a_failing_listener_does_not_stop_the_cache(zk, zk_root, zookeeper):
    seen = []

    def on_change(name, data):
        seen.append((name, data))
        if data == b"boom":
            raise ValueError("listener bug")

    client = make_client(zookeeper.hosts)
    client.start(timeout=10)
    try:
        zk.create(f"{zk_root}/n/a", b"boom", makepath=True)
        cache = ChildrenDataCache(client, f"{zk_root}/n", on_change)
        cache.start()
        wait_until(lambda: seen, 5, what="the first call")
        zk.set(f"{zk_root}/n/a", b"fine")
        wait_until(lambda: seen[-1] == ("a", b"fine"), 5, what="the next change")
        cache.close()
        zk.set(f"{zk_root}/n/a", b"after close")
        threading.Event().wait(0.5)
        assert seen[-1] == ("a", b"fine")  # closed: no more calls
    finally:
        client.stop()
        client.close()


def test_the_polling_handler_waits_like_select():
    import socket

    from streammanager.registry import PollingHandler

    handler = PollingHandler()
    a, b = socket.socketpair()
    try:
        assert handler.select([a], [], [], 0.05) == ([], [], [])  # nothing to read: times out
        b.send(b"x")
        assert handler.select([a, b], [], [], 1.0) == ([a], [], [])
        readable, writable, _ = handler.select([a], [b], [], 1.0)
        assert readable == [a] and writable == [b]
        b.close()
        assert handler.select([], [], [], 0) == ([], [], [])
        a.recv(1)
        assert handler.select([a], [], [], 1.0) == ([a], [], [])  # the peer hung up: readable (EOF)
    finally:
        a.close()
