"""The host's registry feed: one watcher streaming node records to the API workers, and the workers'
fall-back to watching ZooKeeper themselves when it goes. Against the real ZooKeeper and real agents."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import requests

from streammanager.feed import RegistryFeed, decode_entries, encode_entries
from streammanager.models import StreamKey
from streammanager.registry import RegistryView, ZkPaths, make_client
from streammanager.zookeeper import free_port
from tests.conftest import BIN, wait_until


def test_entries_survive_encoding():
    entries = {"edge-a": b'{"v": 1}', "n%2Fé": b"", "gone": None}
    assert decode_entries(encode_entries(entries)) == list(entries.items())
    with pytest.raises(ValueError):
        decode_entries(encode_entries({"edge-a": b"0123456789"})[:-3])


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="sm-feed-test-")  # short: a Unix socket path holds 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def feed_and_view(zookeeper, zk_root, socket_dir):
    made = []

    def start(with_feed: bool = True):
        paths = ZkPaths(zk_root)
        feed = None
        sock = os.path.join(socket_dir, "registry.sock")
        if with_feed:
            feed = RegistryFeed(make_client(zookeeper.hosts), paths.nodes, sock)
            feed.start()
        view = RegistryView(make_client(zookeeper.hosts), paths, feed_socket=sock)
        view.start()
        made.append((feed, view))
        assert view.wait_initialized(10)
        return feed, view

    yield start
    for feed, view in made:
        view.close()
        view._client.stop()
        view._client.close()
        if feed is not None:
            feed.close()


def node_ids(view):
    return {record.id for record in view.nodes()}


def test_a_fed_view_follows_nodes_arriving_changing_and_leaving(feed_and_view, make_node):
    first = make_node("origin", "us-east-1")
    feed, view = feed_and_view()
    assert view.source == "feed"
    wait_until(lambda: node_ids(view) == {first.id}, 5, what="the first node, from the snapshot")
    second = make_node("edge", "eu-west-1")
    wait_until(lambda: node_ids(view) == {first.id, second.id}, 5, what="a node that arrived later")
    assert first.publish("cam1").status_code == 200
    wait_until(lambda: view.live_stream(StreamKey("live", "cam1")) is not None, 5, what="the published stream")
    second.agent.stop()
    wait_until(lambda: node_ids(view) == {first.id}, 8, what="the node that left")
    assert view.connected and view.age_ms() == 0


def test_a_view_watches_by_itself_when_the_feed_goes(feed_and_view, make_node, zk, zk_root):
    staying, leaving = make_node("origin", "us-east-1"), make_node("edge", "us-east-1")
    feed, view = feed_and_view()
    wait_until(lambda: node_ids(view) == {staying.id, leaving.id}, 5, what="both nodes")
    # The feed stops hearing from ZooKeeper (its view goes stale, and says so), a node leaves, then
    # the feed goes: the view must find out from ZooKeeper that the node left while it was not told.
    feed._client.stop()
    wait_until(lambda: not view.connected, 5, what="the feed's disconnection, reported")
    leaving.agent.stop()
    wait_until(lambda: zk.exists(ZkPaths(zk_root).node(leaving.id)) is None, 5, what="the node's record gone")
    assert leaving.id in node_ids(view)
    feed.close()
    wait_until(lambda: view.source == "zookeeper", 5, what="the fall-back to direct watching")
    wait_until(lambda: node_ids(view) == {staying.id}, 8, what="the node that left meanwhile")
    late = make_node("edge", "eu-west-1")
    wait_until(lambda: node_ids(view) == {staying.id, late.id}, 5, what="a node after the fall-back")


def _watching_by_itself(feed_and_view, nodes: set[str]):
    """A view fed until it has ``nodes``, then watching ZooKeeper by itself: its feed went."""
    feed, view = feed_and_view()
    wait_until(lambda: node_ids(view) == nodes, 5, what="the nodes, fed")
    feed.close()
    wait_until(lambda: view.source == "zookeeper", 5, what="the fall-back to direct watching")
    return view


def test_a_view_returns_to_a_feed_that_comes_back(feed_and_view, make_node, zookeeper, zk_root, socket_dir):
    staying, leaving = make_node("origin", "us-east-1"), make_node("edge", "us-east-1")
    feed, view = feed_and_view()
    wait_until(lambda: node_ids(view) == {staying.id, leaving.id}, 5, what="both nodes")
    feed.close()
    wait_until(lambda: view.source == "zookeeper", 5, what="the fall-back to direct watching")
    # while the view watches by itself: one node leaves, one arrives
    leaving.agent.stop()
    arrived = make_node("edge", "eu-west-1")
    wait_until(lambda: node_ids(view) == {staying.id, arrived.id}, 8, what="the changes, watched directly")
    again = RegistryFeed(make_client(zookeeper.hosts), ZkPaths(zk_root).nodes, os.path.join(socket_dir, "registry.sock"))
    again.start()
    try:
        wait_until(lambda: view.source == "feed", 10, what="the view back on the feed")
        assert node_ids(view) == {staying.id, arrived.id}
        # from now on the records come through the feed: it goes stale with it, and says so
        late = make_node("origin", "eu-west-1")
        wait_until(lambda: node_ids(view) == {staying.id, arrived.id, late.id}, 5, what="a node after the return")
        again._client.stop()
        wait_until(lambda: not view.connected, 5, what="the new feed's disconnection, reported")
    finally:
        again.close()


def test_a_view_does_not_return_to_a_feed_that_has_not_loaded_the_registry(feed_and_view, make_node, socket_dir,
                                                                          monkeypatch):
    from streammanager import feed as feed_module, registry

    monkeypatch.setattr(registry, "FEED_RETRY_S", 0.3)
    monkeypatch.setattr(registry, "FEED_CATCH_UP_S", 2.0)
    first, second = make_node("origin", "us-east-1"), make_node("edge", "us-east-1")
    feed, view = feed_and_view()
    wait_until(lambda: node_ids(view) == {first.id, second.id}, 5, what="both nodes")
    feed.close()
    wait_until(lambda: view.source == "zookeeper", 5, what="the fall-back to direct watching")
    # A feed that has sent part of the registry and is still loading (no READY): switching to it would
    # drop every node it has not read yet. It must be passed over until it has loaded everything.
    sock_path = os.path.join(socket_dir, "registry.sock")
    os.unlink(sock_path)
    partial_feed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial_feed.bind(sock_path)
    partial_feed.listen(8)
    stop = threading.Event()

    def serve_partly():
        partial_feed.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                conn, _ = partial_feed.accept()
                conn.sendall(feed_module.frame(feed_module.SNAPSHOT, encode_entries({}))
                             + feed_module.frame(feed_module.STATE, feed_module.STATE_BODY.pack(1, 0)))
                conns.append(conn)
            except socket.timeout:
                pass
            for conn in conns:
                try:
                    conn.sendall(feed_module.frame(feed_module.HEARTBEAT))
                except OSError:
                    pass
        for conn in conns:
            conn.close()
    server = threading.Thread(target=serve_partly, daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert view.source == "zookeeper" and node_ids(view) == {first.id, second.id}
            time.sleep(0.1)
    finally:
        stop.set()
        server.join(5)
        partial_feed.close()
    late = make_node("edge", "eu-west-1")  # still watched, directly
    wait_until(lambda: node_ids(view) == {first.id, second.id, late.id}, 5, what="a node, watched directly")


def test_without_a_feed_the_view_watches_by_itself(feed_and_view, make_node):
    node = make_node("origin", "us-east-1")
    _, view = feed_and_view(with_feed=False)
    assert view.source == "zookeeper"
    wait_until(lambda: node_ids(view) == {node.id}, 5, what="the node")


def feed_pid(master_pid: int) -> int | None:
    out = subprocess.run(["pgrep", "-P", str(master_pid), "-f", "streammanager.feed"], capture_output=True,
                         text=True).stdout.split()
    return int(out[0]) if out else None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])  # gone, or hung (heard from no more)
def test_serve_runs_one_feed_and_survives_losing_it(procs, spawn_agent, zookeeper, zk_root, tmp_path, sig):
    port = free_port()
    env = {"SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root, "SM_BIND": f"127.0.0.1:{port}",
           "SM_ACCESS_TOKEN": "tok", "SM_LOG_FORMAT": "text"}
    api = procs([str(BIN / "streammanager"), "serve"], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}/healthz"

    def health():
        try:
            return requests.get(url, timeout=1).json()
        except (requests.RequestException, ValueError):
            return {}
    spawn_agent("origin", "us-east-1")
    wait_until(lambda: health().get("nodes") == 1, 30, what="the API with one node")
    assert all(health()["registrySource"] == "feed" for _ in range(10)), api.log()
    pid = feed_pid(api.pid)
    assert pid is not None, api.log()
    os.kill(pid, sig)
    try:
        if sig == signal.SIGKILL:
            # the server starts another feed, and every worker (each connection may reach either) returns to it
            wait_until(lambda: feed_pid(api.pid) not in (None, pid), 10, what="another registry feed")
            spawn_agent("edge", "us-east-1")
            wait_until(lambda: all(health().get("registrySource") == "feed" and health().get("nodes") == 2
                                   for _ in range(10)), 20, what="every worker back on the new feed")
            log = api.log()  # how it ended, when gunicorn's master (which reaps any child) did not reap it first
            assert f"the registry feed (pid {pid}) was killed by SIGKILL" in log or f"(pid {pid}) ended" in log
        else:
            # a hung feed: every worker goes on by itself, still follows the registry, and does not go back
            wait_until(lambda: all(health().get("registrySource") == "zookeeper" for _ in range(10)), 15,
                       what="the workers watching ZooKeeper themselves")
            spawn_agent("edge", "us-east-1")
            wait_until(lambda: all(health().get("nodes") == 2 for _ in range(10)), 10,
                       what="a new node in every worker")
            assert feed_pid(api.pid) == pid
            assert all(health().get("registrySource") == "zookeeper" for _ in range(10))
    finally:
        if sig == signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)
    api.stop()
    assert feed_pid(api.pid) is None


def test_a_view_does_not_return_to_a_feed_that_lost_zookeeper(feed_and_view, make_node, zookeeper, zk_root,
                                                               socket_dir, monkeypatch):
    """A feed that lost ZooKeeper (SIGSTOPped past its session timeout, a partition) still answers and
    still says READY to a new worker: switching to it replaced the view the worker watched itself with
    the feed's stale snapshot (nodes that arrived meanwhile were dropped) and a disconnected state."""
    from streammanager import registry

    monkeypatch.setattr(registry, "FEED_RETRY_S", 0.3)
    monkeypatch.setattr(registry, "FEED_CATCH_UP_S", 2.0)
    first = make_node("origin", "us-east-1")
    view = _watching_by_itself(feed_and_view, {first.id})
    # another feed loads the registry, then loses ZooKeeper; it still answers its socket
    stale_path = os.path.join(socket_dir, "stale.sock")
    stale = RegistryFeed(make_client(zookeeper.hosts), ZkPaths(zk_root).nodes, stale_path)
    stale.start()
    try:
        wait_until(lambda: stale._initialized, 5, what="the second feed loaded")
        stale._client.stop()
        wait_until(lambda: not stale._state[0], 5, what="the second feed disconnected")
        late = make_node("edge", "us-east-1")  # the view sees it; the disconnected feed does not
        wait_until(lambda: node_ids(view) == {first.id, late.id}, 5, what="a node watched directly")
        os.replace(stale_path, os.path.join(socket_dir, "registry.sock"))  # where the view looks
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert node_ids(view) == {first.id, late.id}, "a node dropped by a switch to a stale feed"
            assert view.connected, "the view switched to a feed that is not connected to ZooKeeper"
            time.sleep(0.02)
        assert view.source == "zookeeper"
    finally:
        stale.close()


def test_a_switch_back_to_the_feed_never_drops_a_node_the_view_has(feed_and_view, make_node, zookeeper, zk_root,
                                                                   socket_dir, monkeypatch):
    """The feed's snapshot is a moment old when the view switches to it: a node the view's own watch saw
    arrive after that moment was reported removed at the switch (lookups could not choose it) until the
    feed's next batch, or, when that feed went away right then, until the direct watch had read it again."""
    from streammanager import feed as feed_module, registry

    monkeypatch.setattr(registry, "FEED_RETRY_S", 0.3)
    first = make_node("origin", "us-east-1")
    view = _watching_by_itself(feed_and_view, {first.id})
    removed = []
    on_change = view._on_change

    def recording(name, data):
        if data is None:
            removed.append(name)
        on_change(name, data)
    monkeypatch.setattr(view, "_on_change", recording)  # what the next feed connection reports through
    late = {}
    catch_up = feed_module.FeedCache.catch_up

    def catch_up_then_a_node_arrives(self, timeout_s):
        catch_up(self, timeout_s)  # the feed's snapshot is read; a node arrives after it
        if not late:
            late["node"] = make_node("edge", "us-east-1")
            wait_until(lambda: late["node"].id in node_ids(view), 5, what="the late node, watched directly")
    monkeypatch.setattr(feed_module.FeedCache, "catch_up", catch_up_then_a_node_arrives)
    again = RegistryFeed(make_client(zookeeper.hosts), ZkPaths(zk_root).nodes, os.path.join(socket_dir, "registry.sock"))
    again.start()
    try:
        wait_until(lambda: view.source == "feed", 10, what="the view back on the feed")
        wait_until(lambda: node_ids(view) == {first.id, late["node"].id}, 5, what="both nodes, fed")
        assert late["node"].id not in removed, "the switch reported a live node removed"
    finally:
        again.close()


def test_a_worker_that_starts_while_the_feed_has_lost_zookeeper_answers_from_the_feeds_view(
        make_node, zookeeper, zk_root, socket_dir):
    """A reload (SIGHUP) or a restarted worker while ZooKeeper is away: the host's feed still holds the
    registry it loaded, which the other workers answer from. The new worker loads it, says its view is
    disconnected, and answers; it waited for a READY the feed sent only once it was in sync again, and
    answered 503 to every lookup until ZooKeeper came back."""
    node = make_node("origin", "us-east-1")
    paths = ZkPaths(zk_root)
    sock = os.path.join(socket_dir, "registry.sock")
    feed = RegistryFeed(make_client(zookeeper.hosts), paths.nodes, sock)
    feed.start()
    view = None
    try:
        wait_until(lambda: feed._initialized and node.id.encode() in b"".join(feed._data.values()), 5,
                   what="the feed loaded the registry")
        feed._client.stop()  # the feed loses ZooKeeper, and keeps answering its socket
        wait_until(lambda: not feed._state[0], 5, what="the feed disconnected")
        view = RegistryView(make_client(zookeeper.hosts), paths, feed_socket=sock)
        view.start()
        assert view.wait_initialized(10), "a new worker's view did not load from the feed"
        assert node_ids(view) == {node.id}
        assert view.source == "feed"
        assert not view.connected  # /healthz says degraded, with the view's age
        wait_until(lambda: view._client.connected, 10, what="the worker's own client connected")  # to stop it
    finally:
        if view is not None:
            view.close()
            view._client.stop()
            view._client.close()
        feed.close()


def test_the_log_says_when_a_fed_view_has_zookeeper_again_not_only_when_it_lost_it(feed_and_view, make_node,
                                                                                  caplog):
    """After an outage the last line in the log was "the registry feed lost ZooKeeper: answering from the
    last view": an operator reading it could not tell whether, or when, the view became current again."""
    import logging

    make_node("origin", "us-east-1")
    feed, view = feed_and_view()
    caplog.set_level(logging.INFO, logger="streammanager.registry")
    feed._client.stop()
    wait_until(lambda: not view.connected, 5, what="the view told the feed lost ZooKeeper")
    assert any("lost ZooKeeper" in r.getMessage() for r in caplog.records)
    feed._client.start(timeout=10)
    wait_until(lambda: view.connected, 10, what="the view told the feed is back")
    wait_until(lambda: any("has ZooKeeper again" in r.getMessage() for r in caplog.records), 5,
               what="a line saying the view is current again")
    back = [r for r in caplog.records if "has ZooKeeper again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO, [r.getMessage() for r in back]


def test_the_log_says_when_a_view_watching_by_itself_has_zookeeper_again(feed_and_view, make_node, caplog):
    import logging

    make_node("origin", "us-east-1")
    _, view = feed_and_view(with_feed=False)
    caplog.set_level(logging.INFO, logger="streammanager.registry")
    view._client.stop()
    wait_until(lambda: not view.connected, 5, what="the view's own connection lost")
    view._client.start(timeout=10)
    wait_until(lambda: view.connected, 10, what="the view's own connection back")
    wait_until(lambda: any("registry connection back" in r.getMessage() for r in caplog.records), 5,
               what="a line saying the view is current again")
    back = [r for r in caplog.records if "registry connection back" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO, caplog.text


def test_the_direct_watch_after_the_feed_went_reads_no_change_into_records_that_did_not_change(
        feed_and_view, make_node, zk, zk_root):
    # the fall-back's first read applied every record again as a change: each switch (and each return to
    # the feed) made sm_view_changes_total jump by the registry's size, as a worker's first load did
    nodes = [make_node("origin", "us-east-1") for _ in range(3)]
    feed, view = feed_and_view()
    wait_until(lambda: node_ids(view) == {n.id for n in nodes}, 5, what="the nodes, fed")
    paths = ZkPaths(zk_root)

    def writes() -> int:
        return sum(zk.exists(paths.node(n.id)).version for n in nodes)

    before, written = view.changes, writes()
    feed.close()
    wait_until(lambda: view.source == "zookeeper", 5, what="the fall-back to direct watching")
    wait_until(lambda: view._cache is not None and view._cache.initialized, 5, what="the direct watch's first read")
    assert view.changes - before <= writes() - written  # only what the agents wrote meanwhile


def test_a_worker_that_exits_is_logged_as_gone_not_as_a_worker_that_stopped_reading(
        feed_and_view, make_node, socket_dir, caplog):
    """Every worker's exit (each reload, each restart) was logged as a warning that it stopped reading."""
    import logging

    make_node("origin", "us-east-1")
    feed, view = feed_and_view()
    caplog.set_level(logging.INFO, logger="streammanager.feed")
    leaving = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leaving.connect(os.path.join(socket_dir, "registry.sock"))
    wait_until(lambda: leaving.recv(65536), 5, what="the snapshot")
    leaving.close()  # as a worker's exit closes it
    make_node("edge", "us-east-1")  # a change: sent to every subscriber
    wait_until(lambda: any("left the registry feed" in r.getMessage() for r in caplog.records), 10,
               what="the worker that left, in the log")
    assert not any("stopped reading" in r.getMessage() for r in caplog.records)
    assert view.source == "feed"  # the other worker is still fed
