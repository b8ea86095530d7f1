"""Real video end to end: ZooKeeper, the API, node agents running nginx-rtmp, ffmpeg relays,
an ffmpeg publisher and ffmpeg players, in two regions on loopback addresses."""
import os
import re
import signal
import subprocess
import time

import pytest
import requests

from node_agent.media import NginxConfig, parse_stat
from tests.conftest import wait_for_nodes, wait_until

P = "/streammanager/api/2.0"
PUBLISH = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=size=320x180:rate=30",
           "-f", "lavfi", "-i", "sine", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
           "-pix_fmt", "yuv420p", "-g", "30", "-c:a", "aac", "-t", "60", "-f", "flv"]


# One GOP (the publisher's -g 30): a keyframe and every frame it leads, decoded, proves that video plays
# through the path under test; at -re each frame more is 1/30 s more of waiting, and proves nothing more.
FRAMES = 30


def frames_read(url: str, frames: int = FRAMES, timeout_s: float = 30) -> int:
    result = subprocess.run(["ffmpeg", "-nostdin", "-i", url, "-frames:v", str(frames), "-f", "null", "-"],
                            capture_output=True, text=True, timeout=timeout_s)
    counts = [int(n) for n in re.findall(r"frame=\s*(\d+)", result.stderr)]
    return max(counts) if result.returncode == 0 and counts else 0


def publish_live(api, procs, origin_host: str, name: str):
    """An ffmpeg test pattern published to ``origin_host``, once the API shows the stream live."""
    publisher = procs(PUBLISH + [f"rtmp://{origin_host}/live/{name}"])
    wait_until(lambda: api.get(f"{P}/event/live/{name}/stats").status_code == 200, 10, what=f"{name} live")
    return publisher


def watch(procs, edge_host: str, name: str, seconds: int = 30):
    """An ffmpeg player on ``edge_host`` for ``seconds``."""
    return procs(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", f"rtmp://{edge_host}/live/{name}",
                  "-t", str(seconds), "-f", "null", "-"])


def hang_up(player) -> None:
    """Close a player that nginx holds without video (its stream has no publisher): ffmpeg sits in a
    read that its first SIGTERM does not interrupt (only a second signal does), so a stop waited out
    its 10 s before the SIGKILL. Its connection closes all the same, as when a viewer closes its player."""
    player.popen.kill()
    player.popen.wait()


def relays_of(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid), "ffmpeg"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def nginx_of(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid), "nginx"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.fixture(params=["ffmpeg"])
def media_cluster(request, api, spawn_agent):
    nodes = {
        "us_origin": spawn_agent("origin", "us-east-1", media="nginx"),
        "eu_edge": spawn_agent("edge", "eu-west-1", media="nginx", extra_args=("--relay", request.param)),
    }
    wait_for_nodes(api, 2)
    return nodes


def test_a_viewer_in_another_region_plays_the_stream_through_the_edge_its_lookup_names(api, media_cluster, procs,
                                                                                     tmp_path):
    broadcast = api.get(f"{P}/event/live/cam1?action=broadcast&region=us-east-1").get_json()
    origin_host = media_cluster["us_origin"][1]
    assert broadcast["serverAddress"] == origin_host
    publisher = procs(PUBLISH + [f"rtmp://{origin_host}/live/cam1?key=secret-key"], log_path=tmp_path / "pub.log")
    wait_until(lambda: api.get(f"{P}/event/live/cam1/stats").status_code == 200, 10, what="the stream live")
    assert [s["name"] for s in api.get(f"{P}/event/list").get_json()] == ["cam1"]

    subscribe = api.get(f"{P}/event/live/cam1?action=subscribe&region=eu-west-1").get_json()
    edge_proc, edge_host = media_cluster["eu_edge"][0], media_cluster["eu_edge"][1]
    assert (subscribe["serverAddress"], subscribe["region"]) == (edge_host, "eu-west-1")
    viewer = watch(procs, edge_host, "cam1")
    assert frames_read(f"rtmp://{edge_host}/live/cam1") >= FRAMES
    wait_until(lambda: api.get(f"{P}/event/live/cam1/stats").get_json()["currentSubscribers"] >= 1, 5,
               what="the players in /stats")
    second_viewer = watch(procs, edge_host, "cam1")
    assert frames_read(f"rtmp://{edge_host}/live/cam1") >= FRAMES
    wait_until(lambda: api.get(f"{P}/event/live/cam1/stats").get_json()["currentSubscribers"] >= 2, 5,
               what="both players in /stats")
    assert len(relays_of(edge_proc.pid)) == 1  # one relay however many players
    def origin_stream():
        doc = api.get(f"{P}/admin/node/{media_cluster['us_origin'][3]}?accessToken=s3cret-token").get_json()
        return doc["streams"][0] if doc["streams"] else {}

    # the origin reports load changes at most once a second: wait for the report, then check it
    wait_until(lambda: origin_stream().get("relays") == 1, 3, what="the origin's report of one relay")
    assert origin_stream()["subscribers"] == 0  # the edge's pull is not a viewer
    second_viewer.stop()

    stopped = time.monotonic()
    publisher.signal(signal.SIGINT)
    wait_until(lambda: api.get(f"{P}/event/live/cam1/stats").status_code == 404, 3, what="stream gone within 3 s")
    assert time.monotonic() - stopped < 3
    hang_up(viewer)  # held by the edge, without video now
    wait_until(lambda: not relays_of(edge_proc.pid), 20, what="the edge's relay to exit")
    edge_doc = api.get(f"{P}/admin/node/{media_cluster['eu_edge'][3]}?accessToken=s3cret-token").get_json()
    wait_until(lambda: api.get(f"{P}/admin/node/{media_cluster['eu_edge'][3]}?accessToken=s3cret-token"
                               ).get_json()["streams"] == [], 10, what="the edge carrying nothing")
    assert edge_doc["state"] == "inservice"


def test_killing_nginx_on_an_edge_is_repaired_by_its_agent(api, media_cluster, procs):
    edge_proc, edge_host = media_cluster["eu_edge"][0], media_cluster["eu_edge"][1]
    [nginx] = nginx_of(edge_proc.pid)
    os.kill(nginx, signal.SIGKILL)
    wait_until(lambda: (found := nginx_of(edge_proc.pid)) and found != [nginx], 10,
               what="a new nginx under the agent")
    origin_host = media_cluster["us_origin"][1]
    publish_live(api, procs, origin_host, "after-crash")
    assert frames_read(f"rtmp://{edge_host}/live/after-crash") >= FRAMES


def test_a_sigkilled_agent_leaves_no_nginx_or_ffmpeg_behind(api, media_cluster, procs):
    edge_proc, edge_host = media_cluster["eu_edge"][0], media_cluster["eu_edge"][1]
    origin_host = media_cluster["us_origin"][1]
    publish_live(api, procs, origin_host, "orphans")
    watch(procs, edge_host, "orphans")
    wait_until(lambda: relays_of(edge_proc.pid), 10, what="a relay on the edge")
    children = nginx_of(edge_proc.pid) + relays_of(edge_proc.pid)
    edge_proc.signal(signal.SIGKILL)
    edge_proc.popen.wait(5)
    wait_until(lambda: all(gone(pid) for pid in children), 5, what="nginx and ffmpeg to die with the agent")
    wait_until(lambda: api.get("/healthz").get_json()["nodes"] == 1, 8, what="the edge out of the registry")


def test_an_agent_without_the_rtmp_module_or_nginx_says_which_package_to_install(monkeypatch):
    import node_agent.media as media

    monkeypatch.setattr(media, "RTMP_MODULE", media.Path("/nonexistent/ngx_rtmp_module.so"))
    with pytest.raises(media.MediaError, match="libnginx-mod-rtmp"):
        media.check_installed()


def test_the_generated_nginx_config_binds_the_node_address_and_points_every_hook_at_the_agent(tmp_path):
    text = NginxConfig(work_dir=tmp_path, host="127.0.1.77", rtmp_port=1935, stat_port=18123,
                       hook_url="http://127.0.1.77:9000/hooks/nginx").render()
    assert "listen 127.0.1.77:1935;" in text and "listen 127.0.0.1:18123;" in text
    for hook in ("on_publish", "on_play", "on_publish_done", "on_play_done", "on_done"):
        assert f"{hook} http://127.0.1.77:9000/hooks/nginx;" in text
    assert "worker_processes 1;" in text and "daemon off;" in text
    assert str(tmp_path) in text and "/var/" not in text


def test_stat_xml_is_read_by_client_id():
    xml = """<rtmp><server><application><name>live</name><live><stream><name>cam</name>
      <client><id>4</id><flashver>LNX 9,0,124,2</flashver><active/></client>
      <client><id>1</id><flashver>FMLE/3.0</flashver><publishing/><active/></client>
      <nclients>2</nclients></stream></live></application></server></rtmp>"""
    stat = parse_stat(xml)
    assert stat["live/cam"].publisher == "1" and stat["live/cam"].clients == {"4"}


def test_a_lost_hook_cannot_leave_a_wrong_count(api, media_cluster, procs):
    """A player whose play_done never came (here: a play hook for a client nginx never had) is
    removed by the reconciliation with nginx's /stat."""
    edge_host, edge_port = media_cluster["eu_edge"][1], media_cluster["eu_edge"][2]
    origin_host = media_cluster["us_origin"][1]
    publish_live(api, procs, origin_host, "recon")
    watch(procs, edge_host, "recon", seconds=40)

    def subscribers():
        return api.get(f"{P}/event/live/recon/stats").get_json()["currentSubscribers"]

    wait_until(lambda: subscribers() == 1, 10, what="the real player counted")
    phantom = requests.post(f"http://{edge_host}:{edge_port}/hooks/nginx", timeout=5, data={
        "call": "play", "app": "live", "name": "recon", "clientid": "99999", "addr": "127.0.0.1",
        "flashver": "LNX 9,0,124,2"})
    assert phantom.status_code == 200
    wait_until(lambda: subscribers() == 2, 3, what="the phantom counted from its hook")
    wait_until(lambda: subscribers() == 1, 12, what="the phantom removed by reconciliation")


def test_an_origin_failover_resumes_the_edge_viewer_without_reconnecting(api, spawn_agent, procs, tmp_path):
    # sessions of 10 s (ZooKeeper's maximum here): the edge fences the dead origin long before that
    slow = {"AGENT_ZK_TIMEOUT_S": "10"}
    first = spawn_agent("origin", "us-east-1", media="nginx", extra_env=slow)
    second = spawn_agent("origin", "us-east-1", media="nginx", extra_env=slow)
    edge = spawn_agent("edge", "us-east-1", media="nginx")
    wait_for_nodes(api, 3)

    def origin_for_broadcast():
        return api.get(f"{P}/event/live/fo?action=broadcast&region=us-east-1").get_json()["serverAddress"]

    chosen = origin_for_broadcast()
    old, new = (first, second) if chosen == first[1] else (second, first)
    procs(PUBLISH + [f"rtmp://{old[1]}/live/fo"])
    wait_until(lambda: api.get(f"{P}/event/live/fo/stats").status_code == 200, 10, what="live")
    progress = tmp_path / "viewer.progress"
    viewer = procs(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", f"rtmp://{edge[1]}/live/fo", "-t", "60",
                    "-f", "null", "-", "-progress", str(progress), "-stats_period", "0.5"])

    def frames():
        found = re.findall(r"frame=(\d+)", progress.read_text()) if progress.exists() else []
        return int(found[-1]) if found else 0

    wait_until(lambda: frames() >= FRAMES, 15, what="the viewer playing")
    old[0].signal(signal.SIGKILL)  # the origin dies with its nginx
    wait_until(lambda: origin_for_broadcast() == new[1], 10, what="the lookup to answer the other origin")
    # the edge's relay saw the origin refuse connections and removed its records (not its session expiry)
    assert f"fenced origin {old[3]}" in edge[0].log()
    before = frames()
    procs(PUBLISH + [f"rtmp://{new[1]}/live/fo"])
    wait_until(lambda: frames() >= before + FRAMES, 20, what="the same viewer receiving video again")
    assert viewer.popen.poll() is None  # never reconnected: the same process kept playing
    viewer.stop()  # while video comes: once its publisher is stopped, the edge holds it (see hang_up)


def _accepts(host: str, port: int = 1935) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_an_encoder_reconnecting_at_once_after_the_origins_nginx_crashed_is_accepted(api, spawn_agent, procs):
    """The dead nginx's publisher is forgotten when nginx dies: it used to refuse the encoder's
    reconnection ("already being published on this node") until the /stat reconciliation noticed."""
    proc, host, _, _ = spawn_agent("origin", "us-east-1", media="nginx")
    wait_for_nodes(api, 1)
    first = publish_live(api, procs, host, "crash")
    [nginx] = nginx_of(proc.pid)
    os.kill(nginx, signal.SIGKILL)
    first.popen.wait(10)  # its connection went with nginx
    wait_until(lambda: (found := nginx_of(proc.pid)) and found != [nginx] and _accepts(host), 15,
               what="a new nginx serving RTMP")
    again = procs(PUBLISH + [f"rtmp://{host}/live/crash"])  # an encoder reconnecting at once
    # refused, it exits; accepted, its video is served (a play before it published is retried)
    wait_until(lambda: again.popen.poll() is not None or frames_read(f"rtmp://{host}/live/crash", 30, 10) >= 30,
               30, what="the reconnected encoder's video, or its refusal")
    assert again.popen.poll() is None, "the reconnecting encoder was refused"


def test_a_hung_nginx_takes_its_node_out_of_service_and_is_replaced(api, spawn_agent, procs):
    proc, host, _, node_id = spawn_agent("origin", "us-east-1", media="nginx")
    wait_for_nodes(api, 1)

    def state():
        return api.get(f"{P}/admin/node/{node_id}?accessToken=s3cret-token").get_json()["state"]

    [nginx] = nginx_of(proc.pid)
    os.kill(nginx, signal.SIGSTOP)  # alive, serving nothing: RTMP connections hang in the listen queue
    try:
        wait_until(lambda: state() != "inservice", 20, what="the node out of service while nginx is hung")
        assert api.get(f"{P}/event/live/hung?action=broadcast&region=us-east-1").status_code != 200
        wait_until(lambda: (found := nginx_of(proc.pid)) and found != [nginx], 20, what="a new nginx")
        wait_until(lambda: state() == "inservice", 20, what="the node back in service")
    finally:
        if not gone(nginx):
            os.kill(nginx, signal.SIGKILL)
    publish_live(api, procs, host, "hung")
    assert frames_read(f"rtmp://{host}/live/hung") >= FRAMES


def test_an_edge_started_with_a_services_usual_open_files_limit_still_serves_past_a_thousand_clients(
        api, spawn_agent, procs, zookeeper, zk_root, tmp_path):
    """systemd starts a service with a soft limit of 1024 open files: nginx (one process, no worker's
    worker_rlimit_nofile) inherited it and, about a thousand clients on, failed every accept."""
    import socket
    from tests.conftest import BIN, _agent_up, next_loopback
    from streammanager.zookeeper import free_port

    _, origin_host, _, _ = spawn_agent("origin", "us-east-1", media="nginx")
    host, port = next_loopback(), free_port()
    hard = open("/proc/self/limits").read().split("Max open files")[1].split()[1]
    edge = procs(["prlimit", f"--nofile=1024:{hard}", "--", str(BIN / "node-agent"), "--role", "edge",
                  "--region", "us-east-1", "--host", host, "--http-port", str(port), "--media", "nginx",
                  "--node-id", f"edge-{host}", "--log-format", "text", "--work-dir", str(tmp_path / "edge")],
                 {"AGENT_ZK_HOSTS": zookeeper.hosts, "AGENT_ZK_ROOT": zk_root}, tmp_path / "edge.log")
    wait_until(lambda: _agent_up(host, port) or edge.popen.poll() is not None, 15, what="the edge serving")
    wait_for_nodes(api, 2)
    publish_live(api, procs, origin_host, "crowd")
    import resource

    soft, hard_self = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:  # this test process holds the 1100 connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard_self), hard_self))
    idle = []
    try:
        for _ in range(1100):  # clients that connected (players still in their handshake, say)
            idle.append(socket.create_connection((host, 1935), timeout=5))
        assert frames_read(f"rtmp://{host}/live/crowd", frames=30, timeout_s=40) >= 30
    finally:
        for sock in idle:
            sock.close()
    assert "Too many open files" not in edge.log()


def test_an_origin_agent_stopped_and_continued_keeps_its_publisher_and_registers_again(api, spawn_agent, procs):
    """SIGSTOP (a frozen container or VM) longer than the stall timeout: on SIGCONT the stall watchdog
    used to see the report loop "stalled" and exit, and its nginx with every publisher went with it."""
    proc, host, _, node_id = spawn_agent("origin", "us-east-1", media="nginx",
                                         extra_env={"AGENT_STALL_TIMEOUT_S": "3", "AGENT_ZK_TIMEOUT_S": "2"})
    wait_for_nodes(api, 1)
    publisher = publish_live(api, procs, host, "frozen")
    proc.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: api.get(f"{P}/event/live/frozen/stats").status_code == 404, 15,
                   what="the stopped agent's session expired")
        time.sleep(2)  # stopped 4 s at least: past its stall timeout (3 s) and the watchdog's pause (PAUSE_S)
    finally:
        proc.signal(signal.SIGCONT)
    wait_until(lambda: api.get(f"{P}/event/live/frozen/stats").status_code == 200 or proc.popen.poll() is not None,
               20, what="the stream claimed again, or the agent gone")
    assert proc.popen.poll() is None, proc.log()[-2000:]
    assert publisher.popen.poll() is None
    assert frames_read(f"rtmp://{host}/live/frozen") >= FRAMES


def test_an_edge_drops_the_viewers_of_a_stream_that_stays_live_nowhere(api, spawn_agent, procs):
    # nginx holds an edge's players until a relay publishes: after the publisher stopped for good they
    # waited on a frozen picture for ever, counted against the edge's capacity
    _, origin_host, _, _ = spawn_agent("origin", "us-east-1", media="nginx")
    _, edge_host, _, edge_id = spawn_agent("edge", "us-east-1", media="nginx", extra_env={"AGENT_VIEWER_WAIT_S": "1"})
    wait_for_nodes(api, 2)
    publisher = publish_live(api, procs, origin_host, "ended")
    viewer = watch(procs, edge_host, "ended", seconds=600)

    def edge_viewers():
        doc = api.get(f"{P}/admin/node/{edge_id}?accessToken=s3cret-token").get_json()
        return sum(s["subscribers"] for s in doc.get("streams", []) if s["name"] == "ended")

    wait_until(lambda: edge_viewers() == 1, 20, what="the viewer on the edge")
    publisher.signal(signal.SIGINT)
    wait_until(lambda: api.get(f"{P}/event/live/ended/stats").status_code == 404, 10, what="the stream ended")
    wait_until(lambda: viewer.popen.poll() is not None, 30, what="the waiting viewer dropped")
    wait_until(lambda: edge_viewers() == 0, 10, what="the edge's load without the dropped viewer")
