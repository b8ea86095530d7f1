"""``streammanager serve`` under gunicorn, with real ZooKeeper servers: concurrency and outages."""
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from streammanager.zookeeper import (
    ZooKeeperConfig,
    ZooKeeperServer,
    ensemble,
    four_letter,
    free_port,
    hosts_of,
)
from tests.conftest import BIN, wait_until

P = "/streammanager/api/2.0"


@pytest.fixture
def serve(procs, tmp_path, zk_root):
    def start(zk_hosts: str, workers: int = 2):
        port = free_port()
        env = {"SM_ZK_HOSTS": zk_hosts, "SM_ZK_ROOT": zk_root, "SM_BIND": f"127.0.0.1:{port}",
               "SM_WORKERS": str(workers), "SM_ACCESS_TOKEN": "tok", "SM_LOG_FORMAT": "text"}
        proc = procs([str(BIN / "streammanager"), "serve"], env, tmp_path / f"api-{port}.log")
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return requests.get(f"{url}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return proc.popen.poll() is not None
        wait_until(healthy, 30, what="the API server")
        assert proc.popen.poll() is None, proc.log()
        return url
    return start


def node_count(url):
    return requests.get(f"{url}/healthz", timeout=2).json()["nodes"]


def publish(host, port, name, clientid="p1"):
    return requests.post(f"http://{host}:{port}/hooks/nginx", timeout=5, data={
        "call": "publish", "app": "live", "name": name, "clientid": clientid, "addr": "127.0.0.1",
        "flashver": "FMLE/3.0", "tcurl": "rtmp://x/live", "type": "live"})


def test_concurrent_broadcast_lookups_on_two_api_servers_answer_one_origin(serve, spawn_agent, zookeeper):
    for _ in range(4):
        spawn_agent("origin", "us-east-1")
    urls = [serve(zookeeper.hosts), serve(zookeeper.hosts)]
    for url in urls:
        wait_until(lambda: node_count(url) == 4, 10, what="4 nodes in view")
    for round_ in range(3):
        barrier = threading.Barrier(16)

        def ask(i):
            barrier.wait()
            response = requests.get(f"{urls[i % 2]}{P}/event/live/race{round_}?action=broadcast", timeout=10)
            assert response.status_code == 200, response.text
            return response.json()["serverAddress"]

        with ThreadPoolExecutor(16) as pool:
            answers = set(pool.map(ask, range(16)))
        assert len(answers) == 1, answers


def test_the_api_answers_from_its_last_view_while_zookeeper_is_down_and_reconnects(serve, spawn_agent, tmp_path,
                                                                                   procs):
    port = free_port()
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "own-zk", port=port, tick_ms=500))
    zk.start()
    try:
        _, o_host, o_port, _ = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_HOSTS": zk.hosts})
        spawn_agent("edge", "us-east-1", extra_env={"AGENT_ZK_HOSTS": zk.hosts})
        url = serve(zk.hosts)
        wait_until(lambda: node_count(url) == 2, 10, what="2 nodes in view")
        assert publish(o_host, o_port, "resilient").status_code == 200
        # both gunicorn workers know the stream (ten answers in a row reach both)
        wait_until(lambda: all(requests.get(f"{url}{P}/event/live/resilient/stats", timeout=2).ok
                               for _ in range(10)), 5, what="the stream live in every worker's view")

        zk.kill()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).json()["zookeeper"] == "disconnected", 10,
                   what="the API to notice the outage")
        threading.Event().wait(1.0)
        health = requests.get(f"{url}/healthz", timeout=2).json()
        assert health["status"] == "degraded" and health["viewAgeMs"] >= 900
        for _ in range(10):  # still answering, from memory
            answer = requests.get(f"{url}{P}/event/live/resilient?action=subscribe", timeout=2)
            assert answer.status_code == 200 and answer.json()["region"] == "us-east-1"
        assert requests.get(f"{url}{P}/event/live/brand-new?action=broadcast", timeout=5).status_code == 200

        zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "own-zk", port=port, tick_ms=500))
        zk.start()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).json()["status"] == "ok", 20,
                   what="the API to reconnect by itself")
        wait_until(lambda: node_count(url) == 2, 15, what="the agents back in the view")
    finally:
        zk.stop()


def test_lookups_and_publishes_survive_the_loss_of_the_ensemble_leader(serve, spawn_agent, tmp_path):
    ports = [free_port() for _ in range(3)]
    servers = ensemble(tmp_path / "ensemble", ports, quorum_base=free_port() % 20000 + 30000,
                       election_base=free_port() % 20000 + 10000, tick_ms=500)
    for server in servers:
        server.start(wait_s=0)
    try:
        for server in servers:
            server.wait_ready(30)
        hosts = hosts_of(servers)
        _, o_host, o_port, _ = spawn_agent("origin", "eu-west-1", extra_env={"AGENT_ZK_HOSTS": hosts})
        spawn_agent("edge", "eu-west-1", extra_env={"AGENT_ZK_HOSTS": hosts})
        url = serve(hosts)
        wait_until(lambda: node_count(url) == 2, 10, what="2 nodes in view")
        assert publish(o_host, o_port, "before").status_code == 200
        before = f"{url}{P}/event/live/before?action=subscribe"
        # both gunicorn workers know the stream (ten answers in a row reach both)
        wait_until(lambda: all(requests.get(before, timeout=2).ok for _ in range(10)), 10,
                   what="the stream in every worker's view")

        leader = next(s for s in servers if "Mode: leader" in four_letter(s.config.port, "srvr"))
        leader.kill()
        for _ in range(20):  # every answer during the fail-over comes from the views
            assert requests.get(f"{url}{P}/event/list", timeout=2).ok
            assert requests.get(before, timeout=2).ok
        wait_until(lambda: publish(o_host, o_port, "after", clientid="p2").status_code == 200, 15,
                   what="a publish accepted by the surviving ensemble")
        wait_until(lambda: requests.get(f"{url}{P}/event/live/after/stats", timeout=2).ok, 10,
                   what="the new stream visible")
        assert requests.get(before, timeout=2).ok
    finally:
        for server in servers:
            server.stop()


def test_gunicorn_workers_stop_cleanly_on_sigterm(procs, tmp_path, zookeeper, zk_root):
    port = free_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts",
                  zookeeper.hosts, "--zk-root", zk_root], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(20) == 0, proc.log()
    assert "Traceback" not in proc.log()
    # a socket per worker: gunicorn's own line named no address ("Listening at:  (pid)"), ours does
    assert f"streammanager API on http://127.0.0.1:{port}" in proc.log()
    assert "Listening at" not in proc.log()


def _up(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def test_a_broadcast_lookup_answers_when_zookeeper_hangs_mid_request(tmp_path, zk_root):
    import os
    import time

    from node_agent.agent import Agent
    from node_agent.config import AgentSettings
    from streammanager.api import create_app
    from streammanager.config import ServerSettings

    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "frozen-zk", port=free_port(), tick_ms=500))
    zk.start()
    agent = Agent(AgentSettings(role="origin", region="us-east-1", host="127.0.1.240", http_port=free_port(),
                                media="none", node_id="o-frozen", zk_hosts=zk.hosts, zk_root=zk_root,
                                zk_timeout_s=30))
    agent.start()
    app = create_app(ServerSettings(zk_hosts=zk.hosts, zk_root=zk_root, zk_timeout_s=30), init_timeout_s=15)
    try:
        api = app.test_client()
        wait_until(lambda: api.get("/healthz").get_json()["nodes"] == 1, 10, what="the node in view")
        freeze(zk.pid)  # still "connected", but nothing answers
        try:
            started = time.monotonic()
            response = api.get(f"{P}/event/live/frozen?action=broadcast")
            assert response.status_code == 200, response.get_data(as_text=True)
            assert response.get_json()["serverAddress"] == "127.0.1.240"
            assert time.monotonic() - started < 5
        finally:
            os.kill(zk.pid, signal.SIGCONT)
    finally:
        app.extensions["sm"].close()
        agent.stop()
        zk.stop()


def test_serve_refuses_an_address_another_server_listens_on(tmp_path, zookeeper, zk_root):
    # Workers listen with SO_REUSEPORT, which would share the port with another server that set it
    # too (a second streammanager serve): the other listener here sets it, and serve must still refuse.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        env = {**os.environ, "SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root,
               "SM_BIND": f"127.0.0.1:{port}"}
        done = subprocess.run([str(BIN / "streammanager"), "serve"], env=env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "in use" in done.stderr
    finally:
        other.close()


def test_serve_with_one_shared_socket_when_reuse_port_is_off(procs, tmp_path, zookeeper, zk_root):
    port = free_port()
    env = {"SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root, "SM_BIND": f"127.0.0.1:{port}",
           "SM_REUSE_PORT": "off", "SM_LOG_FORMAT": "text"}
    proc = procs([str(BIN / "streammanager"), "serve"], env, tmp_path / "api.log")

    def healthy():
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
        except requests.RequestException:
            return proc.popen.poll() is not None
    wait_until(healthy, 30, what="the API server")
    assert proc.popen.poll() is None, proc.log()
    # one listening socket, held by the master: both workers answer through it
    listeners = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert len(listeners.strip().splitlines()) == 1, listeners
    assert f"Listening at: http://127.0.0.1:{port}" in proc.log()  # the master's socket, named
    bad = subprocess.run([str(BIN / "streammanager"), "serve"], env={**os.environ, **env, "SM_REUSE_PORT": "maybe",
                         "SM_BIND": f"127.0.0.1:{free_port()}"}, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "SM_REUSE_PORT" in bad.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_server_stopped_while_waiting_for_its_feed_leaves_nothing_behind(procs, tmp_path, sig):
    # ZooKeeper unreachable: the master waits for the registry feed (up to 15 s) before gunicorn starts.
    # Stopped then, it must stop the feed and remove its directories, without a traceback.
    closed = free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"SM_ZK_HOSTS": f"127.0.0.1:{closed}", "SM_BIND": f"127.0.0.1:{free_port()}", "TMPDIR": str(tmp),
           "SM_LOG_FORMAT": "text"}
    proc = procs([str(BIN / "streammanager"), "serve"], env, tmp_path / "api.log")

    def feed_pid():
        out = subprocess.run(["pgrep", "-P", str(proc.popen.pid), "-f", "streammanager.feed"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None
    wait_until(feed_pid, 15, what="the registry feed to start")
    feed = feed_pid()
    assert proc.popen.poll() is None, proc.log()
    proc.signal(sig)
    assert proc.popen.wait(15) == 128 + sig, proc.log()
    assert "Traceback" not in proc.log()
    wait_until(lambda: not os.path.exists(f"/proc/{feed}") or _zombie(feed), 10, what="the feed to stop")
    assert list(tmp.iterdir()) == []  # no sm-metrics-*, no sm-feed-*


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_clearing_stream_entries_answers_503_in_bounded_time_when_zookeeper_hangs(tmp_path, zk_root, monkeypatch):
    import time

    from streammanager import api as api_module
    from streammanager.api import create_app
    from streammanager.config import ServerSettings

    monkeypatch.setattr(api_module, "ADMIN_ZK_TIMEOUT_S", 1.5)
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "frozen-zk", port=free_port(), tick_ms=500))
    zk.start()
    app = create_app(ServerSettings(zk_hosts=zk.hosts, zk_root=zk_root, zk_timeout_s=30, access_token="tok"),
                     init_timeout_s=15)
    try:
        api = app.test_client()
        assert api.delete(f"{P}/admin/event?accessToken=tok").status_code == 200
        freeze(zk.pid)  # still "connected", but nothing answers
        try:
            started = time.monotonic()
            response = api.delete(f"{P}/admin/event?accessToken=tok")
            assert response.status_code == 503, response.get_data(as_text=True)
            assert "did not complete the clear" in response.get_json()["errorMessage"]
            assert time.monotonic() - started < 5
        finally:
            os.kill(zk.pid, signal.SIGCONT)
        wait_until(lambda: api.delete(f"{P}/admin/event?accessToken=tok").status_code == 200, 15,
                   what="the clear to work again")
    finally:
        app.extensions["sm"].close()
        zk.stop()


def test_a_stop_closes_idle_keep_alive_connections_at_once_and_finishes_a_request_under_way(
        procs, tmp_path, zookeeper, zk_root):
    # gunicorn's ASGI worker alone waited graceful_timeout (10 s) for any idle keep-alive connection
    port = free_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts",
                  zookeeper.hosts, "--zk-root", zk_root, "--log-format", "text"], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    for conn in idle:  # one answered request each, then nothing: idle keep-alive connections
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    under_way = socket.create_connection(("127.0.0.1", port), timeout=10)
    under_way.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the request's end not sent yet
    threading.Event().wait(0.3)
    proc.signal(signal.SIGTERM)
    for conn in idle:
        assert conn.recv(65536) == b""  # closed by the server, not left to the 10 s graceful timeout
        conn.close()
    under_way.sendall(b"\r\n")
    answer = under_way.recv(65536)
    under_way.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert proc.popen.wait(8) == 0, proc.log()
    log = proc.log()
    assert "idle keep-alive connections" in log and "Forcing close" not in log and "Traceback" not in log


def test_a_stop_answers_the_request_of_a_connection_opened_just_before_it(procs, tmp_path, zookeeper, zk_root):
    """A connection that has sent nothing yet was opened for a request on its way: closed with the idle
    keep-alive ones, that request was reset (a lost request at each reload or rolling restart)."""
    port = free_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts",
                  zookeeper.hosts, "--zk-root", zk_root, "--workers", "1", "--log-format", "text"],
                 log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    kept_alive = socket.create_connection(("127.0.0.1", port), timeout=10)
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    fresh = socket.create_connection(("127.0.0.1", port), timeout=10)
    threading.Event().wait(0.3)  # accepted by the worker, waiting for its first request
    proc.signal(signal.SIGTERM)
    assert kept_alive.recv(65536) == b""  # the stop has begun: the kept-alive connection is closed
    fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    try:
        answer = fresh.recv(65536)
    except ConnectionResetError:
        answer = b"reset"
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert proc.popen.wait(8) == 0, proc.log()


def test_the_registry_feed_watches_the_zookeeper_given_on_the_command_line(procs, spawn_agent, tmp_path,
                                                                           zookeeper, zk_root):
    # the environment names another ZooKeeper and root: the options must win for the feed too
    spawn_agent("origin", "us-east-1")
    port = free_port()
    env = {"SM_ZK_HOSTS": f"127.0.0.1:{free_port()}", "SM_ZK_ROOT": "/not-this-one"}
    procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts", zookeeper.hosts,
           "--zk-root", zk_root], env, tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    for _ in range(10):  # both workers
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
        assert (health["registrySource"], health["nodes"]) == ("feed", 1), health


def test_a_claim_an_unpublish_could_not_release_is_released_once_zookeeper_answers(tmp_path, zk_root):
    # ZooKeeper hangs during the unpublish: the claim must not outlive the publish (another origin's
    # encoder would be refused for as long as the first agent's session lives)
    from node_agent.agent import Agent
    from node_agent.config import AgentSettings
    from tests.conftest import LocalNode, next_loopback

    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "hung-zk", port=free_port(), tick_ms=500))
    zk.start()
    origins = []
    try:
        for name in ("a", "b"):
            host = next_loopback()
            agent = Agent(AgentSettings(role="origin", region="us-east-1", host=host, http_host=host,
                                        http_port=free_port(), media="none", node_id=f"o-{name}", zk_hosts=zk.hosts,
                                        zk_root=zk_root, zk_timeout_s=30, report_interval_s=0.5))
            agent.start()
            origins.append(LocalNode(agent))
        a, b = origins
        assert a.publish("held", clientid="p1").status_code == 200
        freeze(zk.pid)
        try:
            assert a.hook("publish_done", "held", clientid="p1").status_code == 200  # the release times out
        finally:
            os.kill(zk.pid, signal.SIGCONT)
        wait_until(lambda: b.publish("held", clientid="p2").status_code == 200, 10,
                   what="the claim released, the stream free for another origin")
    finally:
        for node in origins:
            node.agent.stop()
        zk.stop()


def test_agents_and_the_api_come_back_to_a_zookeeper_that_lost_its_data(tmp_path, zk_root, procs):
    # A server refuses clients that saw later transactions than its own: after a restart with its
    # data wiped, nobody was let back in until new writes caught up with what each client had seen.
    import shutil

    from kazoo.client import KazooClient
    from node_agent.agent import Agent
    from node_agent.config import AgentSettings
    from tests.conftest import LocalNode, next_loopback

    port = free_port()
    data = tmp_path / "wiped-zk"
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=data, port=port, tick_ms=500))
    zk.start()
    host = next_loopback()
    agent = Agent(AgentSettings(role="origin", region="us-east-1", host=host, http_host=host, http_port=free_port(),
                                media="none", node_id="o-wiped", zk_hosts=zk.hosts, zk_root=zk_root,
                                zk_timeout_s=2, report_interval_s=0.5))
    agent.start()
    api_port = free_port()
    api = procs([str(BIN / "streammanager"), "serve"], {"SM_ZK_HOSTS": zk.hosts, "SM_ZK_ROOT": zk_root,
                "SM_BIND": f"127.0.0.1:{api_port}", "SM_ZK_TIMEOUT_S": "2", "SM_LOG_FORMAT": "text"},
                tmp_path / "api.log")
    url = f"http://127.0.0.1:{api_port}"
    try:
        assert LocalNode(agent).publish("kept", clientid="p1").status_code == 200
        writer = KazooClient(hosts=zk.hosts)
        writer.start(timeout=10)
        writer.ensure_path("/churn")
        for i in range(300):  # history the wiped ensemble will not have
            writer.set("/churn", str(i).encode())
        writer.stop()
        writer.close()
        wait_until(lambda: _up(api_port) and requests.get(f"{url}{P}/event/live/kept/stats", timeout=2).ok, 30,
                   what="the stream live in the API")
        threading.Event().wait(1.5)  # pings carry the latest transaction id to every client
        zk.stop()
        shutil.rmtree(data)
        zk = ZooKeeperServer(ZooKeeperConfig(data_dir=data, port=port, tick_ms=500))
        zk.start()
        wait_until(lambda: agent.client.connected and agent._registered_session == agent.client.client_id[0]
                   and agent.client.exists(f"{zk_root}/v1/streams/live/kept") is not None, 30,
                   what="the agent registered again with its stream")
        wait_until(lambda: all(requests.get(f"{url}/healthz", timeout=2).json()["status"] == "ok"
                               for _ in range(10)), 30, what="every API worker connected again")
        wait_until(lambda: requests.get(f"{url}{P}/event/live/kept/stats", timeout=2).ok, 10,
                   what="the stream live in the API again")
    finally:
        agent.stop()
        api.stop()
        zk.stop()


def test_a_server_started_before_zookeeper_answers_503_starting_then_serves(procs, tmp_path, zk_root):
    zk_port, port = free_port(), free_port()
    procs([str(BIN / "streammanager"), "serve"], {"SM_ZK_HOSTS": f"127.0.0.1:{zk_port}", "SM_ZK_ROOT": zk_root,
          "SM_BIND": f"127.0.0.1:{port}", "SM_LOG_FORMAT": "text"}, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"

    def health():
        try:
            response = requests.get(f"{url}/healthz", timeout=2)
            return response.status_code, response.json()
        except (requests.RequestException, ValueError):
            return None, {}
    wait_until(lambda: health()[0] == 503, 30, what="the server answering while ZooKeeper is away")
    assert health()[1]["status"] == "starting"
    lookup = requests.get(f"{url}{P}/event/live/x?action=subscribe", timeout=2)
    assert lookup.status_code == 503 and "not loaded" in lookup.json()["errorMessage"]
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "late-zk", port=zk_port, tick_ms=500))
    zk.start()
    try:
        wait_until(lambda: all(health()[0] == 200 for _ in range(10)), 30, what="every worker loaded")
    finally:
        zk.stop()


def _raw(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /streammanager/api/2.0/event/live/" + b"x" * 5000 + b"?action=subscribe HTTP/1.1\r\nHost: t\r\n\r\n",
     "414"),  # a request line over gunicorn's 4 KB limit
    (b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 100) for i in range(120))
     + b"\r\n", "431"),  # headers over gunicorn's limits
    (b"HELLO THERE\r\n\r\n", "400"),  # not HTTP
])
def test_errors_gunicorn_answers_itself_come_in_the_api_error_shape(procs, tmp_path, zookeeper, zk_root,
                                                                     request_bytes, status):
    import json
    port = free_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts",
                  zookeeper.hosts, "--zk-root", zk_root, "--log-format", "text"], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    line, headers, body = _raw(port, request_bytes)
    assert line.split()[1] == status, (line, body)
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"errorMessage", "timestamp"} and doc["errorMessage"] and isinstance(doc["timestamp"], int)
    assert int(headers["content-length"]) == len(body)
    assert _raw(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")[0].split()[1] == "200"


def test_metrics_show_the_live_view_whichever_worker_answers_the_scrape(serve, spawn_agent, zookeeper):
    # A scraper keeps one connection: one worker answers every scrape. The other workers' view gauges
    # were set only when they answered a scrape themselves, so the aggregate kept their old numbers.
    from prometheus_client.parser import text_string_to_metric_families

    url = serve(zookeeper.hosts, workers=3)

    def view_nodes(session=requests):
        text = session.get(f"{url}/metrics", timeout=5).text
        return next(f.samples[0].value for f in text_string_to_metric_families(text) if f.name == "sm_view_nodes")
    agents = [spawn_agent("edge", "us-east-1") for _ in range(3)]
    wait_until(lambda: all(node_count(url) == 3 for _ in range(12)), 20, what="three nodes in every worker")
    for _ in range(12):  # fresh connections: every worker answers a scrape at three nodes
        assert view_nodes() == 3
    for proc, *_ in agents[1:]:
        proc.stop()
    wait_until(lambda: all(node_count(url) == 1 for _ in range(12)), 20, what="one node in every worker")
    scraper = requests.Session()
    wait_until(lambda: view_nodes(scraper) == 1, 5, what="sm_view_nodes at one node, on one connection")


def _time_wait_port() -> int:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its side of the connection waits in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    return port


def test_serve_starts_at_once_where_a_server_just_stopped(procs, tmp_path, zookeeper, zk_root):
    # a stopped server's closed connections wait in TIME_WAIT for a minute: a plain bind refused the
    # address to the next server all that time ("is another server running there?")
    port = _time_wait_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts",
                  zookeeper.hosts, "--zk-root", zk_root, "--log-format", "text"], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port) or proc.popen.poll() is not None, 30, what="the API")
    assert proc.popen.poll() is None, proc.log()


def _api(procs, tmp_path, zookeeper, zk_root, *extra):
    port = free_port()
    procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts", zookeeper.hosts,
           "--zk-root", zk_root, "--log-format", "text", *extra], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    return port


def test_a_connection_that_never_completes_its_first_request_is_closed(procs, tmp_path, zookeeper, zk_root):
    from streammanager.server import FIRST_REQUEST_TIMEOUT_S

    port = _api(procs, tmp_path, zookeeper, zk_root)
    stalled = []
    for partial in (b"", b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nHost: t\r\n"):
        conn = socket.create_connection(("127.0.0.1", port), timeout=FIRST_REQUEST_TIMEOUT_S + 10)
        conn.sendall(partial)
        stalled.append(conn)
    for conn in stalled:  # gunicorn held these for good: no timeout before a connection's first request
        assert conn.recv(65536) == b""  # closed by the server (a timeout here raises)
        conn.close()


def test_a_websocket_upgrade_is_answered_as_the_plain_request_it_also_is(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root)
    line, headers, _ = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n"
                                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert line.split()[1] == "200" and headers["content-type"] == "application/json"  # not gunicorn's empty 403


def test_a_client_that_half_closes_after_its_request_gets_the_answer(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root)
    for path in (b"/healthz", b"/streammanager/api/2.0/event/live/none?action=subscribe"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            conn.shutdown(socket.SHUT_WR)  # as `nc -N` does: the request is all it will send
            answer = b""
            while chunk := conn.recv(65536):  # until the server closes
                answer += chunk
        assert answer, "the server closed the connection without an answer"  # what it did before
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"200", b"404"), answer
        # no "Connection: close" asserted: a lookup answered on the loop may be written before the EOF is read
        assert json.loads(body)


def test_a_client_that_pipelines_requests_then_half_closes_gets_every_answer(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        # the first is answered by Flask on a thread, so the server reads the EOF before it answers
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /streammanager/api/2.0/event/live/none?action=subscribe HTTP/1.1\r\nHost: t\r\n\r\n")
        conn.shutdown(socket.SHUT_WR)  # both requests are all it will send
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes
            answer += chunk
    heads = re.findall(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n(.*?)\r\n\r\n", answer, re.S)
    assert [status for status, _ in heads] == [b"200", b"404"], answer  # the second was dropped with the connection
    assert [b"connection: close" in head.lower() for _, head in heads] == [False, True]  # the last answer ends it


def test_a_pipelined_request_whose_body_the_half_close_cut_short_is_not_waited_for(procs, tmp_path, zookeeper,
                                                                                     zk_root):
    # The EOF is read while the first request is served, its body complete; the second waits in the parser
    # behind it, its body cut short by the EOF. It was fed again once the first was answered, waited for
    # the body's timeout (10 s, the connection held all along) and answered 408 to a body that cannot come.
    port = _api(procs, tmp_path, zookeeper, zk_root, "--access-token", "t")
    body = b'{"name": "x"}'
    post = (f"POST {P}/admin/nodegroup?accessToken=t HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for second in (post + body[:4], post, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + post + body[:4]):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(post + body + second)
            conn.shutdown(socket.SHUT_WR)  # the rest of the last body never comes
            answer = b""
            while chunk := conn.recv(65536):  # until the server closes
                answer += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        expected = [b"400", b"200"] if second.startswith(b"GET") else [b"400"]
        assert statuses == expected, answer  # no 408 for the cut body, after its 10 s timeout


def test_slow_request_bodies_hold_none_of_the_flask_threads(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root, "--workers", "1", "--threads", "1", "--access-token", "t")
    slow = []
    for _ in range(3):  # bodies that never finish: each held a Flask thread for gunicorn's 30 s body timeout
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn.sendall(b"POST /streammanager/api/2.0/admin/nodegroup?accessToken=t HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        slow.append(conn)
    try:
        answer = requests.get(f"http://127.0.0.1:{port}/streammanager/api/2.0/event/list", timeout=5)
        assert answer.status_code == 200
    finally:
        for conn in slow:
            conn.close()


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count


def test_a_client_that_leaves_before_its_answer_or_mid_body_leaves_no_connection_behind(procs, tmp_path, zookeeper,
                                                                                       zk_root):
    # Kept open after the client's EOF (to answer a half-close), a connection whose client had closed its
    # socket was never closed: the answer drew a reset, gunicorn's close failed on it, and every client
    # that gave up on its request (a timeout) leaked a descriptor of the worker. A body cut short by the
    # EOF was waited for until the body timeout, then answered to no one, and leaked the same way.
    port = free_port()
    proc = procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--zk-hosts", zookeeper.hosts,
                  "--zk-root", zk_root, "--log-format", "text", "--workers", "1", "--registry-feed", "off",
                  "--access-token", "t"], log_path=tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    worker = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
    before = _sockets(worker)
    requests_ = [b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n"
                 for path in (b"/healthz", b"/metrics", f"{P}/event/live/none?action=subscribe".encode())]
    requests_.append(f"POST {P}/admin/nodegroup?accessToken=t HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                     "\r\nContent-Length: 1000\r\n\r\n{".encode())  # the body's first byte only
    for request in requests_ * 3:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request)  # and gone at once, before the answer
    wait_until(lambda: _sockets(worker) <= before, 5, what="the worker to close every connection its clients left")
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(15) == 0, proc.log()
    assert "Waiting for" not in proc.log() and "Traceback" not in proc.log()  # no connection left for the stop


def test_a_chunked_request_body_reaches_the_flask_routes(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root, "--access-token", "t")
    doc = b'{"name": "x"}'
    answer = requests.post(f"http://127.0.0.1:{port}/streammanager/api/2.0/admin/nodegroup?accessToken=t",
                           data=iter([doc[:4], doc[4:]]), headers={"Content-Type": "application/json"}, timeout=10)
    # the document is read (and refused for what it lacks), not taken for a missing body
    assert answer.status_code == 400 and "launchConfig" in answer.json()["errorMessage"], answer.text


def test_admin_and_command_calls_answer_503_while_zookeeper_is_down_and_change_nothing_later(serve, tmp_path):
    from tests.test_groups import EXAMPLE

    port = free_port()
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "own-zk", port=port, tick_ms=500))
    zk.start()
    try:
        url = serve(zk.hosts, workers=1)
        admin = f"{url}{P}/admin/nodegroup?accessToken=tok"
        assert requests.get(admin, timeout=5).json() == []
        zk.kill()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).json()["zookeeper"] == "disconnected", 10,
                   what="the API to notice the outage")
        # each hung as long as the outage (kazoo queues calls while it reconnects)
        for answer in (requests.post(admin, json=EXAMPLE, timeout=5), requests.get(admin, timeout=5),
                       requests.post(f"{url}/commands/close", timeout=5,
                                     headers={"x-streaming-channel": "live/x", "x-streaming-id": "*"})):
            assert answer.status_code == 503 and "unreachable" in answer.json()["errorMessage"], answer.text
        zk = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "own-zk", port=port, tick_ms=500))
        zk.start()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=2).json()["status"] == "ok", 20,
                   what="the API to reconnect")
        # the admin calls' own session may come back a moment after the view's (a loaded machine): any call
        # kazoo had queued would have been sent by then
        wait_until(lambda: requests.get(admin, timeout=5).status_code == 200, 20, what="the admin calls back")
        threading.Event().wait(1.0)
        answer = requests.get(admin, timeout=5)
        assert answer.json() == [], answer.text  # the refused create was not made after all
    finally:
        zk.stop()


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads has stopped: kill() returns before they
    have, and ZooKeeper's threads answered a request or two in between on a busy machine."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(stopped, 10, what=f"every thread of {pid} stopped")


def _listen_backlog(port: int) -> int | None:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    return int(out[2]) if len(out) > 2 else None


def test_a_worker_out_of_descriptors_says_so_once_and_listens_with_the_configured_backlog(procs, tmp_path,
                                                                                          zookeeper, zk_root):
    port = free_port()
    proc = procs(["bash", "-c", f'ulimit -n 96 && exec "{BIN / "streammanager"}" serve'],
                 {"SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root, "SM_BIND": f"127.0.0.1:{port}",
                  "SM_WORKERS": "1", "SM_LOG_FORMAT": "text", "SM_REGISTRY_FEED": "off"}, tmp_path / "api.log")
    wait_until(lambda: _up(port), 30, what="the API")
    backlog = _listen_backlog(port)
    conns = []
    try:
        for _ in range(200):  # more than the worker has descriptors: the rest wait in the backlog
            try:
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(4)
    finally:
        for conn in conns:
            conn.close()
    wait_until(lambda: _up(port), 20, what="the API once the connections closed")
    records = proc.log().count("out of system resource") + proc.log().count("cannot accept connections")
    assert 1 <= records <= 3, f"{records} log records for one descriptor exhaustion"
    assert backlog == 2048  # gunicorn's "backlog" (asyncio listen()ed again with its own 100)


def test_a_body_over_the_limit_is_a_413_that_says_the_connection_closes(procs, tmp_path, zookeeper, zk_root):
    port = _api(procs, tmp_path, zookeeper, zk_root, "--access-token", "t")
    line, headers, body = _raw(port, b"POST /streammanager/api/2.0/admin/nodegroup?accessToken=t HTTP/1.1\r\n"
                                     b"Host: t\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"
                                     + b"{" * 70000)
    assert line.split()[1] == "413" and "larger than" in body.decode()
    assert headers.get("connection") == "close", headers


@pytest.mark.parametrize("auth", [None, "Bearer"])
def test_serve_warns_when_the_close_command_takes_no_credentials(procs, tmp_path, zookeeper, zk_root, auth):
    extra = ("--commands-api-auth", auth, "--commands-api-auth-token", "app-token") if auth else ()
    port = _api(procs, tmp_path, zookeeper, zk_root, *extra)
    log = (tmp_path / "api.log").read_text()
    assert ("COMMANDS_API_AUTH is unset" in log) == (auth is None), log
    status = requests.post(f"http://127.0.0.1:{port}/commands/close", timeout=10,
                           headers={"x-streaming-channel": "live/x", "x-streaming-id": "*"}).status_code
    assert status == (404 if auth is None else 401)  # the contract is unchanged
