"""``node-agent --media none`` as a real process: hooks over HTTP, deregistration, crash detection."""
import json
import os
import signal
import subprocess
import threading
import time

import requests

from streammanager.zookeeper import free_port
from tests.conftest import BIN, next_loopback, wait_for_nodes, wait_until

P = "/streammanager/api/2.0"
NGINX_PUBLISH = {"call": "publish", "app": "live", "name": "cam", "clientid": "7", "addr": "127.0.0.1",
                 "flashver": "FMLE/3.0 (compatible; FMSc/1.0)", "tcurl": "rtmp://127.0.1.9:1935/live",
                 "type": "live", "key": "k-123"}


def post_form(host, port, form):
    return requests.post(f"http://{host}:{port}/hooks/nginx", data=form, timeout=5)


def post_json(host, port, body):
    return requests.post(f"http://{host}:{port}/hooks/srs", json=body, timeout=5)


def live(api, name):
    return api.get(f"{P}/event/live/{name}/stats").status_code == 200


def test_an_agent_process_registers_and_its_hooks_drive_the_api(api, spawn_agent):
    _, o_host, o_port, _ = spawn_agent("origin", "us-east-1")
    _, e_host, e_port, _ = spawn_agent("edge", "us-east-1")
    wait_for_nodes(api, 2)
    assert post_form(o_host, o_port, NGINX_PUBLISH).status_code == 200
    wait_until(lambda: live(api, "cam"), 3, what="published stream in the API")
    play = {"call": "play", "app": "live", "name": "cam", "clientid": "21", "addr": "127.0.0.1",
            "flashver": "LNX 9,0,124,2", "start": "-2", "duration": "0", "reset": "0"}
    assert post_form(e_host, e_port, play).status_code == 200
    wait_until(lambda: api.get(f"{P}/event/live/cam/stats").get_json()["currentSubscribers"] == 1, 2,
               what="the player counted within 2 s")
    post_form(e_host, e_port, {**play, "call": "play_done"})
    wait_until(lambda: api.get(f"{P}/event/live/cam/stats").get_json()["currentSubscribers"] == 0, 2,
               what="the player gone within 2 s")
    post_form(o_host, o_port, {**NGINX_PUBLISH, "call": "publish_done"})
    wait_until(lambda: not live(api, "cam"), 2, what="unpublished stream gone")


def test_malformed_hook_bodies_get_400_and_change_nothing(api, spawn_agent):
    _, host, port, node_id = spawn_agent("origin", "us-east-1")
    wait_for_nodes(api, 1)
    bad_forms = [
        {},
        {"call": "publish"},
        {"call": "explode", "app": "live", "name": "x", "clientid": "1"},
        {**NGINX_PUBLISH, "name": ""},
        {**NGINX_PUBLISH, "name": "a/b"},
        {**NGINX_PUBLISH, "app": ""},
        {**NGINX_PUBLISH, "clientid": ""},
    ]
    for form in bad_forms:
        response = post_form(host, port, form)
        assert response.status_code == 400, (form, response.text)
    url = f"http://{host}:{port}"
    assert requests.post(f"{url}/hooks/nginx", data="{}", headers={"Content-Type": "application/json"},
                         timeout=5).status_code == 400
    for body in (b"not json", b"[]", b'{"action": "on_publish"}', b'{"action": "on_fly", "client_id": "1"}',
                 b'{"action": "on_publish", "client_id": "1", "app": "live", "stream": "../x"}',
                 b'{"action": "on_publish", "client_id": "1", "app": "live", "stream": "x", "tcUrl": "rtmp://[::1/live"}',
                 b'{"action": "on_connect", "client_id": "1", "app": "live", "tcUrl": "rtmp://[127.0.0.1/live?k=1"}',
                 b'{"action": "on_publish", "client_id": "1", "app": "live", "stream": 55}',
                 b'{"action": "on_publish", "client_id": "1", "app": ["live"], "stream": "x"}',
                 b'{"action": "on_publish", "client_id": [1], "app": "live", "stream": "x"}',
                 b'{"action": "on_publish", "client_id": {"a": 1}, "app": "live", "stream": "x"}',
                 b'{"a": ' * 100_000 + b'1' + b'}' * 100_000):
        response = requests.post(f"{url}/hooks/srs", data=body, headers={"Content-Type": "application/json"},
                                 timeout=5)
        assert response.status_code == 400, (body, response.text)
    time.sleep(1.2)
    assert api.get(f"{P}/event/list").get_json() == []
    node = api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").get_json()
    assert node["streams"] == [] and node["publishers"] == 0


def test_srs_callbacks_answer_zero_and_drive_the_registry(api, spawn_agent):
    _, o_host, o_port, _ = spawn_agent("origin", "eu-west-1")
    _, e_host, e_port, _ = spawn_agent("edge", "eu-west-1")
    wait_for_nodes(api, 2)
    base = {"ip": "192.0.2.10", "vhost": "__defaultVhost__", "app": "live", "stream": "srs1",
            "tcUrl": "rtmp://127.0.0.1/live", "server_id": "vid-1", "service_id": "svc"}
    connect = post_json(o_host, o_port, {**base, "action": "on_connect", "client_id": 3, "pageUrl": ""})
    assert (connect.status_code, connect.text) == (200, "0")
    publish = post_json(o_host, o_port, {**base, "action": "on_publish", "client_id": "3", "param": "?key=abc"})
    assert (publish.status_code, publish.text) == (200, "0")
    wait_until(lambda: live(api, "srs1"), 3, what="SRS-published stream live")
    duplicate = post_json(o_host, o_port, {**base, "action": "on_publish", "client_id": "4", "param": ""})
    assert duplicate.status_code != 200 and duplicate.text != "0"
    assert post_json(e_host, e_port, {**base, "action": "on_play", "client_id": 9, "param": "",
                                      "pageUrl": ""}).text == "0"
    wait_until(lambda: api.get(f"{P}/event/live/srs1/stats").get_json()["currentSubscribers"] == 1, 2,
               what="SRS player counted")
    assert post_json(e_host, e_port, {**base, "action": "on_stop", "client_id": 9}).text == "0"
    assert post_json(o_host, o_port, {**base, "action": "on_unpublish", "client_id": "3"}).text == "0"
    assert post_json(o_host, o_port, {**base, "action": "on_close", "client_id": "3", "send_bytes": 1,
                                      "recv_bytes": 2}).text == "0"
    wait_until(lambda: not live(api, "srs1"), 2, what="SRS stream gone")


def test_sigterm_deregisters_the_node_at_once(api, spawn_agent):
    proc, host, port, node_id = spawn_agent("origin", "us-east-1")
    wait_for_nodes(api, 1)
    post_form(host, port, {**NGINX_PUBLISH, "name": "bye"})
    wait_until(lambda: live(api, "bye"), 3, what="live")
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(10) == 0
    wait_until(lambda: api.get("/healthz").get_json()["nodes"] == 0, 1.0, what="node gone within 1 s")
    assert not live(api, "bye")


def test_a_sigkilled_agent_leaves_every_lookup_within_the_session_timeout(api, spawn_agent, zk, zk_root):
    proc, host, port, node_id = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_TIMEOUT_S": "2"})
    spawn_agent("edge", "us-east-1")
    wait_for_nodes(api, 2)
    post_form(host, port, {**NGINX_PUBLISH, "name": "doomed"})
    wait_until(lambda: live(api, "doomed"), 3, what="live")
    assert api.get(f"{P}/event/live/doomed?action=subscribe").status_code == 200
    killed_at = time.monotonic()
    proc.signal(signal.SIGKILL)
    proc.popen.wait(5)
    wait_until(lambda: not live(api, "doomed"), 8, what="stream gone after SIGKILL")
    gone_after = time.monotonic() - killed_at
    assert api.get(f"{P}/event/live/doomed?action=subscribe").status_code == 404
    assert api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").status_code == 404
    assert zk.get_children(f"{zk_root}/v1/streams/live") == []
    # session timeout 2 s plus at most one tickTime (500 ms) and our polling
    assert gone_after < 4.0, f"took {gone_after:.1f} s"


def test_agent_refuses_bad_configuration_with_a_clear_message():
    result = subprocess.run([str(BIN / "node-agent"), "--role", "origin", "--media", "none"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--region" in result.stderr
    result = subprocess.run([str(BIN / "node-agent"), "--role", "origin", "--region", "r", "--host", "not-an-ip",
                             "--media", "none"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--host" in result.stderr
    assert "AGENT_ZK_HOSTS" in subprocess.run([str(BIN / "node-agent"), "--help"], capture_output=True,
                                              text=True, timeout=30).stdout


def test_an_agent_stopped_while_zookeeper_is_unreachable_at_start_stops_at_once(procs, tmp_path):
    host, port = next_loopback(), free_port()
    agent = procs([str(BIN / "node-agent"), "--role", "edge", "--region", "us-east-1", "--media", "none",
                   "--host", host, "--http-port", str(port), "--log-format", "text"],
                  {"AGENT_ZK_HOSTS": f"127.0.0.1:{free_port()}"}, tmp_path / "agent.log")  # nothing listens there
    wait_until(lambda: _answers(host, port), 15, what="the agent's hook server")  # it waits for ZooKeeper now
    agent.signal(signal.SIGTERM)
    # it waited out its connection timeout, or its 20 s stop deadline (exit 1, "stopping took over 20 s")
    assert agent.popen.wait(30) == 0, agent.log()
    assert "stopped before it registered" in agent.log()


def _answers(host: str, port: int) -> bool:
    try:
        requests.get(f"http://{host}:{port}/healthz", timeout=0.5)
        return True
    except requests.RequestException:
        return False


def test_agent_health_endpoint_names_the_node(spawn_agent):
    _, host, port, node_id = spawn_agent("edge", "us-east-1")
    body = requests.get(f"http://{host}:{port}/healthz", timeout=5).json()
    assert body == {"status": "ok", "nodeId": node_id, "role": "edge", "zookeeper": "connected"}


def test_an_agent_whose_report_loop_stalls_closes_its_session_and_leaves_every_answer(api, make_node):
    from node_agent.cli import _fence_if_stalled

    node = make_node("edge", "us-east-1", stall_timeout_s=1.0)
    wait_for_nodes(api, 1)
    node.agent._stopping.set()  # the report loop stops running, as if it were stuck
    node.agent._wake.set()
    exits = []
    stop = threading.Event()
    watchdog = threading.Thread(target=_fence_if_stalled, args=(node.agent, stop), kwargs={"exit": exits.append},
                                daemon=True)
    watchdog.start()
    wait_until(lambda: exits == [70], 10, what="the watchdog to give up on the agent")
    wait_for_nodes(api, 0)  # its session closed: the node left the registry at once
    stop.set()


def test_an_agent_reports_itself_healthy_only_once_registered(make_node):
    from node_agent.hooks import create_hooks_app

    node = make_node("edge", "us-east-1")
    assert node.hooks.get("/healthz").status_code == 200
    node.agent.registered.clear()  # as between its start and its registration
    starting = create_hooks_app(node.agent).test_client().get("/healthz")
    assert starting.status_code == 503 and starting.get_json()["status"] == "starting"


def test_an_agent_given_a_relative_work_dir_runs_its_media_server(spawn_agent, tmp_path):
    """``make demo`` passes work directories relative to the checkout: nginx must still find its files."""
    relative = os.path.relpath(tmp_path / "relative-node")
    assert not os.path.isabs(relative)
    proc, host, port, node_id = spawn_agent("edge", "us-east-1", media="nginx", extra_args=("--work-dir", relative))
    assert requests.get(f"http://{host}:{port}/healthz", timeout=2).ok
    assert (tmp_path / "relative-node" / "nginx.conf").is_file()
    assert proc.popen.poll() is None, proc.log()


def test_an_origin_back_after_its_session_expired_gives_up_a_stream_another_origin_took(api, spawn_agent, zk,
                                                                                          zk_root):
    proc, host, port, node_id = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_TIMEOUT_S": "2"})
    _, b_host, b_port, b_id = spawn_agent("origin", "us-east-1")
    wait_for_nodes(api, 2)
    assert post_form(host, port, {**NGINX_PUBLISH, "name": "contested"}).status_code == 200
    claim = f"{zk_root}/v1/streams/live/contested"
    wait_until(lambda: zk.exists(claim) is not None, 3, what="claimed")
    proc.signal(signal.SIGSTOP)  # frozen past its session timeout: ZooKeeper drops its claim
    try:
        wait_until(lambda: zk.exists(claim) is None, 10, what="the frozen origin's claim to go")
        assert post_form(b_host, b_port, {**NGINX_PUBLISH, "name": "contested", "clientid": "8"}).status_code == 200
    finally:
        proc.signal(signal.SIGCONT)
    # the claim decides: the origin that came back stops publishing, and every answer names the other one

    def a_publishes():
        doc = api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").get_json()
        return doc.get("streams") and any(s["name"] == "contested" and s["publishing"] for s in doc["streams"])
    wait_until(lambda: api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").status_code == 200
               and not a_publishes(), 15, what="the returning origin to give the stream up")
    assert json.loads(zk.get(claim)[0])["node_id"] == b_id
    assert api.get(f"{P}/event/live/contested?action=broadcast").get_json()["serverAddress"] == b_host
    assert api.get(f"{P}/event/live/contested/stats").get_json()["serverAddress"] == b_host
    assert "dropping its publisher here" in proc.log()


def test_a_second_live_agent_with_the_same_node_id_is_refused_and_a_restarted_one_takes_its_place(
        api, spawn_agent, procs, zookeeper, zk_root, tmp_path):
    # a 2 s session: the restarted agent waits out the crashed one's (the twin's wait is REGISTER_WAIT_S)
    first, host, port, node_id = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_TIMEOUT_S": "2"})
    wait_for_nodes(api, 1)
    post_form(host, port, {**NGINX_PUBLISH, "name": "mine"})
    wait_until(lambda: live(api, "mine"), 3, what="live")
    def argv():
        return [str(BIN / "node-agent"), "--role", "origin", "--region", "us-east-1", "--host", "127.0.1.250",
                "--http-port", str(free_port()), "--media", "none", "--node-id", node_id, "--log-format", "text"]
    env = {"AGENT_ZK_HOSTS": zookeeper.hosts, "AGENT_ZK_ROOT": zk_root, "AGENT_ZK_TIMEOUT_S": "2"}
    twin = procs(argv(), env, tmp_path / "twin.log")
    assert twin.popen.wait(30) == 1, twin.log()
    assert "registered by another live agent" in twin.log() and host in twin.log()
    doc = api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").get_json()
    assert doc["serverAddress"] == host and live(api, "mine")  # the first one untouched
    # a crashed agent restarted at once under its id waits out its old session and takes its place
    first.signal(signal.SIGKILL)
    first.popen.wait(5)
    again = procs(argv(), env, tmp_path / "again.log")
    wait_until(lambda: api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").get_json()
               .get("serverAddress") == "127.0.1.250", 20, what="the restarted agent registered")
    assert again.popen.poll() is None, again.log()


def test_the_hook_server_closes_stalled_connections_and_refuses_unreadable_bodies(spawn_agent, api):
    import socket

    from node_agent.cli import HOOK_SOCKET_TIMEOUT_S

    _, host, port, _ = spawn_agent("origin", "us-east-1")
    wait_until(lambda: requests.get(f"http://{host}:{port}/healthz", timeout=2).ok, 15, what="the agent")
    stalled = []
    for partial in (b"", b"POST /hooks/nginx HT", b"POST /hooks/nginx HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n\r\ncall=pub"):
        conn = socket.create_connection((host, port), timeout=HOOK_SOCKET_TIMEOUT_S + 10)
        conn.sendall(partial)
        stalled.append(conn)
    # nginx's hooks go on meanwhile
    assert post_form(host, port, NGINX_PUBLISH).status_code == 200
    for conn in stalled:  # each held a thread and a descriptor for good
        while conn.recv(65536):  # an answer (a timeout's 408 or nothing), then the close; a timeout raises
            pass
        conn.close()
    with socket.create_connection((host, port), timeout=10) as conn:  # chunked framing that is not
        conn.sendall(b"POST /hooks/nginx HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\nzz\r\ncall=publish\r\n0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400" and b"malformed hook" in answer, answer


def test_an_agent_cut_off_from_zookeeper_says_so_in_its_health_and_ok_again_once_registered_anew(make_node,
                                                                                                 caplog):
    """Its /healthz said "status": "ok" all through a ZooKeeper outage, when past its session timeout
    the node had left every answer; and after the outage, nothing in its log said it registered again."""
    import logging

    node = make_node("edge", "us-east-1")
    caplog.set_level(logging.INFO, logger="node_agent.agent")
    assert node.hooks.get("/healthz").get_json()["status"] == "ok"
    node.agent.client.stop()  # its session is gone, as after an outage longer than the timeout
    cut_off = node.hooks.get("/healthz")
    assert cut_off.status_code == 200  # it still answers its media server's hooks
    assert cut_off.get_json()["status"] == "degraded" and cut_off.get_json()["zookeeper"] == "disconnected"
    node.agent.client.start(timeout=10)
    wait_until(lambda: node.hooks.get("/healthz").get_json()["status"] == "ok", 10, what="registered again")
    assert any("registered again" in r.getMessage() for r in caplog.records), caplog.text
