"""Shared fixtures: a real ZooKeeper started through our own code, a fresh registry root per test,
the API app, in-process agents and node-agent processes on loopback addresses.

Every process a fixture starts is stopped by PID at teardown.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import requests

from node_agent.agent import Agent
from node_agent.config import AgentSettings
from node_agent.hooks import create_hooks_app
from streammanager.config import ServerSettings
from streammanager.registry import make_client
from streammanager.zookeeper import ZooKeeperConfig, ZooKeeperServer, free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# TEST_LOOPBACK_START lets two suites run side by side without sharing 127.0.1.x:1935
_loopback = itertools.count(int(os.environ.get("TEST_LOOPBACK_START", "10")))


def next_loopback() -> str:
    """A fresh 127.0.1.x address for a simulated node."""
    n = next(_loopback)
    return f"127.0.1.{n % 250 + 2}"


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory):
    server = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path_factory.mktemp("zk"), port=free_port(),
                                             tick_ms=500, heap_mb=256))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zk_root():
    return f"/sm-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def zk(zookeeper):
    client = make_client(zookeeper.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def server_settings(zookeeper, zk_root):
    return ServerSettings(zk_hosts=zookeeper.hosts, zk_root=zk_root, access_token="s3cret-token",
                          log_format="text")


@pytest.fixture
def make_app(server_settings):
    from streammanager.api import create_app

    apps = []

    def build(**overrides):
        settings = server_settings
        if overrides:
            settings = ServerSettings(**{**settings.__dict__, **overrides})
        app = create_app(settings, init_timeout_s=15)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["sm"].close()


@pytest.fixture
def api(make_app):
    """A Flask test client of the API, on a fresh registry root."""
    return make_app().test_client()


class LocalNode:
    """An in-process agent (``--media none``) with a test client for its hooks."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.hooks = create_hooks_app(agent).test_client()
        self._clientids = itertools.count(1)

    @property
    def id(self) -> str:
        return self.agent.settings.node_id

    @property
    def host(self) -> str:
        return self.agent.settings.host

    def hook(self, call: str, name: str, scope: str = "live", clientid: str | int | None = None, **extra):
        clientid = clientid if clientid is not None else next(self._clientids)
        form = {"call": call, "app": scope, "name": name, "clientid": str(clientid), "addr": "127.0.0.1",
                "flashver": "FMLE/3.0", "tcurl": f"rtmp://{self.host}/{scope}", **extra}
        return self.hooks.post("/hooks/nginx", data=form)

    def publish(self, name: str, scope: str = "live", clientid: str | int = "pub-1"):
        return self.hook("publish", name, scope, clientid, type="live")

    def play(self, name: str, scope: str = "live", clientid: str | int | None = None):
        return self.hook("play", name, scope, clientid, start="-2", duration="0", reset="0")


@pytest.fixture
def make_node(zookeeper, zk_root):
    nodes = []

    def build(role: str, region: str, capacity: int | None = None, group: str = "default", **kw) -> LocalNode:
        host = next_loopback()
        settings = AgentSettings(
            role=role, region=region, group=group, host=host, http_host=host, http_port=free_port(),
            capacity=capacity or (50 if role == "origin" else 200), media="none",
            node_id=kw.pop("node_id", f"{role}-{region}-{host}"), zk_hosts=zookeeper.hosts, zk_root=zk_root,
            report_interval_s=kw.pop("report_interval_s", 0.5), **kw,
        )
        agent = Agent(settings)
        agent.start()
        node = LocalNode(agent)
        nodes.append(node)
        return node

    yield build
    for node in nodes:
        node.agent.stop()


def wait_for_nodes(api_client, count: int, timeout_s: float = 10.0):
    def ready():
        body = api_client.get("/healthz").get_json()
        return body and body.get("nodes") == count
    wait_until(ready, timeout_s, what=f"{count} nodes in the API's view")


class Proc:
    """A child process of a test, stopped by PID at teardown."""

    def __init__(self, argv, env=None, log_path: Path | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if log_path:
            out.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@pytest.fixture
def procs():
    started: list[Proc] = []

    def spawn(argv, env=None, log_path=None) -> Proc:
        proc = Proc(argv, env, log_path)
        started.append(proc)
        return proc

    yield spawn
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def spawn_agent(procs, zookeeper, zk_root, tmp_path):
    """Start ``node-agent --media none`` as a process; returns (proc, host, http_port, node_id)."""

    def spawn(role: str, region: str, capacity: int = 100, extra_env=None, media: str = "none",
              extra_args=()):
        host = next_loopback()
        port = free_port()
        node_id = f"{role}-{region}-{host}"
        argv = [str(BIN / "node-agent"), "--role", role, "--region", region, "--host", host,
                "--http-port", str(port), "--capacity", str(capacity), "--media", media,
                "--node-id", node_id, "--log-format", "text", "--work-dir", str(tmp_path / node_id),
                *extra_args]
        env = {"AGENT_ZK_HOSTS": zookeeper.hosts, "AGENT_ZK_ROOT": zk_root, **(extra_env or {})}
        proc = procs(argv, env, tmp_path / f"{node_id}.log")
        wait_until(lambda: _agent_up(host, port) or proc.popen.poll() is not None, 15,
                   what=f"agent {node_id} to serve")
        assert proc.popen.poll() is None, proc.log()
        return proc, host, port, node_id

    return spawn


def _agent_up(host: str, port: int) -> bool:
    try:
        return requests.get(f"http://{host}:{port}/healthz", timeout=0.5).ok
    except requests.RequestException:
        return False


def asgi_get(front, url: str, headers: tuple = ()) -> tuple[int, dict, bytes]:
    """One GET through an ASGI app, as gunicorn's asgi worker calls it (the path percent-decoded)."""
    return asgi_call(front, "GET", url, headers)


def asgi_call(front, method: str, url: str, headers: tuple = ()) -> tuple[int, dict, bytes]:
    """One request without a body through an ASGI app, as gunicorn's asgi worker calls it."""
    parts = urlsplit(url)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": unquote(parts.path), "raw_path": parts.path.encode(),
             "query_string": parts.query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1:5080"), *headers],
             "server": ("127.0.0.1", 5080), "client": ("127.0.0.1", 40000)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(front(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def front(make_app, cluster):
    """The server's ASGI front over a fresh app that sees the ``cluster`` fixture's four nodes."""
    from streammanager.front import ApiFront

    app = make_app()
    wait_for_nodes(app.test_client(), 4)
    return ApiFront(app)
