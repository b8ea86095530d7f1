"""``streammanager demo`` brings a cluster up, its printed commands work, and Ctrl-C stops it all."""
import json
import re
import signal
import subprocess
import time

import requests

from streammanager.zookeeper import free_port
from tests.conftest import BIN, wait_until


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def instance_pids(tmp_path) -> list[int]:
    """The node agents the demo's controller launched (local provider: detached, like VMs)."""
    return [json.loads(p.read_text())["pid"] for p in (tmp_path / "demo" / "local-cloud").glob("*.json")]


def start_demo(procs, tmp_path, *extra):
    api_port, zk_port, base = free_port(), free_port(), free_port() % 20000 + 40000
    proc = procs([str(BIN / "streammanager"), "demo", "--api-port", str(api_port), "--zk-port", str(zk_port),
                  "--agent-base-port", str(base), "--work-dir", str(tmp_path / "demo"), *extra],
                 log_path=tmp_path / "demo.log")
    wait_until(lambda: "Ctrl-C stops everything" in proc.log() or proc.popen.poll() is not None, 60,
               what="the demo to come up")
    assert proc.popen.poll() is None, proc.log()
    return proc, api_port


def stop_demo(proc, children):
    proc.signal(signal.SIGINT)
    assert proc.popen.wait(30) == 0
    time.sleep(0.5)
    for pid in children:
        stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
        assert stat.strip() == "" or stat.startswith("Z"), f"pid {pid} still running"  # gone or a zombie
    assert "nothing is left running" in proc.log()


def test_the_demo_plays_real_video_with_the_commands_it_prints_and_ctrl_c_stops_everything(procs, tmp_path):
    proc, api_port = start_demo(procs, tmp_path)
    out = proc.log()
    children = children_of(proc.pid) + instance_pids(tmp_path)
    assert len(children) == 7  # ZooKeeper, the API server, the controller and four node agents
    lines = [line.strip() for line in out.splitlines()]
    publish_url = next(line for line in lines if line.startswith("URL=") and "broadcast" in line)
    publish = next(line for line in lines if line.startswith("ffmpeg -re"))
    play_url = next(line for line in lines if line.startswith("URL=") and "subscribe" in line)
    play = next(line for line in lines if line.startswith("ffmpeg -i"))
    publisher = procs(["bash", "-c", f"{publish_url}; echo \"publishing to $URL\"; "
                                     f"exec {publish.replace('ffmpeg ', 'ffmpeg -nostdin -t 40 ', 1)}"],
                      log_path=tmp_path / "publisher.log")
    stats = f"http://127.0.0.1:{api_port}/streammanager/api/2.0/event/live/demo/stats"
    try:
        wait_until(lambda: requests.get(stats, timeout=2).status_code == 200, 15, what="the stream live")
    except AssertionError as exc:  # say why: the publisher's side and the cluster's
        raise AssertionError(f"{exc}\n--- publisher:\n{publisher.log()[-3000:]}\n--- demo:\n{proc.log()[-6000:]}") \
            from None
    played = subprocess.run(["bash", "-c", f"{play_url}; {play.replace('ffmpeg ', 'ffmpeg -nostdin ', 1)}"],
                            capture_output=True, text=True, timeout=60)
    frames = [int(n) for n in re.findall(r"frame=\s*(\d+)", played.stderr)]
    assert played.returncode == 0 and frames and max(frames) >= 90, played.stderr[-2000:]
    publisher.stop()
    stop_demo(proc, children)


def test_the_demo_with_simulated_nodes_works_through_the_hooks_it_prints(procs, tmp_path):
    proc, api_port = start_demo(procs, tmp_path, "--media", "none")
    out = proc.log()
    children = children_of(proc.pid) + instance_pids(tmp_path)
    assert len(children) == 7  # ZooKeeper, the API server, the controller and four node agents

    commands = re.findall(r"^  (curl -s .*)$", out, re.M)
    broadcast, publish, subscribe, play = commands[0], commands[1], commands[2], commands[3]
    assert "action=broadcast" in broadcast and "call=publish" in publish
    origin = subprocess.run(broadcast, shell=True, capture_output=True, text=True, timeout=10).stdout
    assert '"scope":"/live"' in origin
    assert subprocess.run(publish, shell=True, capture_output=True, text=True, timeout=10).stdout.strip() == "OK"
    stats = f"http://127.0.0.1:{api_port}/streammanager/api/2.0/event/live/demo/stats"
    wait_until(lambda: requests.get(stats, timeout=2).status_code == 200, 1, what="the published stream live")
    edge = subprocess.run(subscribe, shell=True, capture_output=True, text=True, timeout=10).stdout
    assert '"region":"eu-west-1"' in edge
    assert subprocess.run(play, shell=True, capture_output=True, text=True, timeout=10).stdout.strip() == "OK"
    wait_until(lambda: requests.get(stats, timeout=2).json().get("currentSubscribers") == 1, 3,
               what="the viewer in the stats")
    # the servers' output, which the terminal keeps quiet about, is kept (it was dropped: an error at
    # start-up said "see the log above", and there was nothing above)
    kept = (tmp_path / "demo" / "cluster.log").read_text()
    assert all(f"cluster.{name}:" in kept for name in ("api", "controller")) and "zookeeper serving" in kept
    assert "cluster.api:" not in out

    stop_demo(proc, children)
    # and again, in the same directory (a second `make demo`): the last run's registry held the node
    # group, and the demo stopped at once with "node group 'demo' exists"
    again, api_port = start_demo(procs, tmp_path, "--media", "none")
    children = children_of(again.pid) + instance_pids(tmp_path)
    assert len(children) == 7
    stop_demo(again, children)
