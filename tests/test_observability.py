"""What an operator sees: /metrics as Prometheus parses it, the server's log lines, secrets kept out of logs.

None of these needs ZooKeeper or a listening server (the metrics test forks processes that share a
multiprocess directory, as gunicorn's workers do).
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from flask import Flask

from streammanager import logs
from streammanager.config import ServerSettings


class _View:
    connected = True
    initialized = True
    changes = 0
    changes_at_load = 0
    decode_errors = 0
    source = "zookeeper"

    def node_count(self):
        return 3

    def stream_count(self):
        return 1

    def age_ms(self):
        return 0


def test_metrics_are_served_with_a_content_type_prometheus_can_parse():
    """Flask appended "; charset=utf-8" to CONTENT_TYPE_LATEST, which has one: a duplicate parameter
    is not a valid media type (Go's mime.ParseMediaType refuses it; Prometheus 3 fails the scrape)."""
    from streammanager.api import ops

    app = Flask("t")
    app.extensions["sm"] = SimpleNamespace(view=_View())
    app.register_blueprint(ops)
    content_type = app.test_client().get("/metrics").headers["Content-Type"]
    params = [p.split("=")[0].strip().lower() for p in content_type.split(";")[1:]]
    assert len(params) == len(set(params)), content_type
    assert content_type.split(";")[0] == "text/plain"


def test_a_dead_workers_view_gauges_leave_the_metrics(tmp_path):
    """A worker that died (restarted by gunicorn) kept its last sm_view_nodes in the "max" aggregation
    for the life of the server: 55 nodes shown long after the registry had 4."""
    script = textwrap.dedent("""
        import os, sys
        from prometheus_client import CollectorRegistry, multiprocess
        from prometheus_client.multiprocess import MultiProcessCollector
        import streammanager.api as api
        pid = os.fork()
        if pid == 0:
            api.VIEW_NODES.set(55)
            os._exit(0)
        os.waitpid(pid, 0)
        multiprocess.mark_process_dead(pid)   # what serve's child_exit does
        api.VIEW_NODES.set(4)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        print(registry.get_sample_value("sm_view_nodes"))
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == 4.0


def test_gunicorn_lines_are_json_objects_with_the_json_log_format(tmp_path, capsys):
    from streammanager.server import ApiServer

    server = ApiServer(ServerSettings(log_format="json", bind="127.0.0.1:8999"), str(tmp_path))
    logger = server.cfg.logger_class(server.cfg)
    logger.info("Booting worker with pid: %s", 123)
    logger.error("Worker (pid:%s) was sent SIGKILL!\nsecond line", 123)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_a_path_with_a_newline_cannot_write_a_line_of_its_own(tmp_path):
    """gunicorn's default pre_request hook logged the decoded path at DEBUG: '/x%0A{...}' wrote a forged
    record."""
    from streammanager.server import ApiServer

    server = ApiServer(ServerSettings(log_format="text", log_level="DEBUG", bind="127.0.0.1:8999"), str(tmp_path))
    stream = io.StringIO()
    log = logging.getLogger("test-pre-request")
    log.handlers[:] = [logging.StreamHandler(stream)]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    server.cfg.pre_request(SimpleNamespace(log=log), SimpleNamespace(method="GET", path='/x\n{"level":"error"}'))
    assert stream.getvalue().count("\n") == 1, stream.getvalue()


def test_the_serve_master_logs_in_the_configured_format(monkeypatch):
    """The master configured no logging: its warnings came out as bare text, and every line of the
    registry feed (pumped into the master's log at INFO) was dropped."""
    from streammanager import server

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = []
        port = held.getsockname()[1]
        assert server.serve(ServerSettings(log_format="json", bind=f"127.0.0.1:{port}")) == 2
        assert any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        held.close()


def test_a_relay_key_is_not_logged_from_ffmpeg_errors(caplog):
    """ffmpeg names its output URL in its errors: 'Error writing trailer of rtmp://EDGE/live/s?relaykey=...'.
    The edge accepts any publisher that has the key."""
    from node_agent.relay import redact_relay_key
    from streammanager.process import Supervised

    caplog.set_level(logging.INFO)
    proc = Supervised("relay-t", [sys.executable, "-c",
                                  "print('Error writing trailer of rtmp://127.0.1.9:1935/live/s?relaykey="
                                  "0123abcd: Broken pipe')"], log_name="node_agent.relay", redact=redact_relay_key)
    proc.start()
    proc.wait(10)
    proc.stop(2)
    text = caplog.text
    assert "Broken pipe" in text and "0123abcd" not in text


def test_urllib3_urls_are_not_logged_at_debug():
    """urllib3's debug lines carry the whole URL: a token in KEY_VERIFICATION_URL's query was logged."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("DEBUG", "json")
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_a_deleted_pool_leaves_the_controller_metrics():
    """sm_pool_nodes of a deleted group (or of a region taken out of one) went on showing its last
    numbers for the life of the controller."""
    from prometheus_client import REGISTRY

    from streammanager import autoscaler
    from streammanager.controller import Controller

    controller = Controller.__new__(Controller)  # _report reads only these
    controller.instances = SimpleNamespace(records=lambda: {})
    controller._holds = {}
    controller._pools_reported = set()

    def pool(group, region):
        return autoscaler.PoolStatus(group, region, "edge", active=3, in_service=3, draining=0, used=1, capacity=10)

    controller._report(autoscaler.Plan(pools=[pool("gone-g", "us-east-1"), pool("kept-g", "us-east-1")]))
    assert REGISTRY.get_sample_value("sm_pool_nodes", {"group": "gone-g", "region": "us-east-1", "role": "edge"}) == 3
    controller._report(autoscaler.Plan(pools=[pool("kept-g", "us-east-1")]))
    assert REGISTRY.get_sample_value("sm_pool_nodes", {"group": "gone-g", "region": "us-east-1", "role": "edge"}) is None
    assert REGISTRY.get_sample_value("sm_pool_nodes", {"group": "kept-g", "region": "us-east-1", "role": "edge"}) == 3


def test_every_line_of_a_node_agent_names_its_node_library_lines_too(capsys):
    """kazoo's own lines ("Session has expired", connection retries) named no node: in a log pipeline
    fed by many agents they could not be told apart."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json", context={"node_id": "edge-7"})
        logging.getLogger("kazoo.client").warning("Session has expired")
        logging.getLogger("node_agent.agent").info("stream published", extra={"node_id": "its-own", "stream": "s"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    library, ours = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (library["logger"], library["node_id"]) == ("kazoo.client", "edge-7")
    assert (ours["node_id"], ours["stream"]) == ("its-own", "s")  # what a call passes is kept
