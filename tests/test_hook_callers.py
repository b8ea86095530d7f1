"""Who may call an agent's hooks: its own media server (this host), not anyone on the network."""
from __future__ import annotations

import http.client
from urllib.parse import urlencode

import requests

from streammanager.models import StreamKey
from streammanager.registry import ZkPaths
from tests.conftest import next_loopback, wait_until


def _post(host: str, port: int, form: dict, source: str | None = None, body: bytes | None = None):
    """POST /hooks/nginx from ``source`` (another address of this machine stands for another host)."""
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0) if source else None)
    try:
        conn.request("POST", "/hooks/nginx", body=body if body is not None else urlencode(form),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _form(call: str, clientid: str, **extra) -> dict:
    return {"call": call, "app": "live", "name": "show", "clientid": clientid, "addr": "198.51.100.7",
            "flashver": "FMLE/3.0", **extra}


def test_a_host_on_the_network_cannot_unpublish_a_stream(spawn_agent, zk, zk_root):
    _, host, port, node_id = spawn_agent("origin", "us-east-1")
    claim = ZkPaths(zk_root).stream(StreamKey("live", "show"))
    status, _ = _post(host, port, _form("publish", "7", type="live"))  # nginx on this host
    assert status == 200
    wait_until(lambda: zk.exists(claim), what="the stream claim")

    intruder = next_loopback()  # the source address of another machine
    for clientid in ("6", "7", "8"):  # nginx's client ids are small numbers: an intruder tries them all
        status, body = _post(host, port, _form("publish_done", clientid), source=intruder)
        assert status == 403, body
    assert zk.exists(claim), "a forged publish_done from another host ended the stream"
    assert requests.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200  # still open to all

    status, _ = _post(host, port, _form("publish_done", "7"))  # the real media server still can
    assert status == 200
    wait_until(lambda: not zk.exists(claim), what="the claim to be released")


def test_hook_clients_admits_a_media_server_elsewhere(spawn_agent):
    srs_host = next_loopback()
    _, host, port, _ = spawn_agent("origin", "us-east-1", extra_args=("--hook-clients", f"{srs_host}/32"))
    status, body = _post(host, port, _form("publish", "9", type="live"), source=srs_host)
    assert status == 200, body
    status, _ = _post(host, port, _form("publish_done", "9"), source=next_loopback())
    assert status == 403


def test_a_huge_hook_body_is_refused_unread(spawn_agent):
    _, host, port, _ = spawn_agent("edge", "us-east-1")
    status, body = _post(host, port, {}, body=b"call=play&" + b"x" * (1 << 20))
    assert status == 413, body
