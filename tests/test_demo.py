"""``streammanager demo`` brings a cluster up, its printed commands work, and Ctrl-C stops it all."""
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


def test_the_demo_runs_a_cluster_whose_printed_commands_work_and_ctrl_c_stops_everything(procs, tmp_path):
    api_port, zk_port, base = free_port(), free_port(), free_port() % 20000 + 40000
    proc = procs([str(BIN / "streammanager"), "demo", "--api-port", str(api_port), "--zk-port", str(zk_port),
                  "--agent-base-port", str(base), "--work-dir", str(tmp_path / "demo")],
                 log_path=tmp_path / "demo.log")
    wait_until(lambda: "Ctrl-C stops everything" in proc.log() or proc.popen.poll() is not None, 60,
               what="the demo to come up")
    out = proc.log()
    assert proc.popen.poll() is None, out
    children = children_of(proc.pid)
    assert len(children) >= 6  # ZooKeeper, the API server and four agents

    commands = re.findall(r"^  (curl -s .*)$", out, re.M)
    broadcast, publish, subscribe, play = commands[0], commands[1], commands[2], commands[3]
    assert "action=broadcast" in broadcast and "call=publish" in publish
    origin = subprocess.run(broadcast, shell=True, capture_output=True, text=True, timeout=10).stdout
    assert '"scope":"/live"' in origin
    assert subprocess.run(publish, shell=True, capture_output=True, text=True, timeout=10).stdout.strip() == "OK"
    edge = subprocess.run(subscribe, shell=True, capture_output=True, text=True, timeout=10).stdout
    assert '"region":"eu-west-1"' in edge
    assert subprocess.run(play, shell=True, capture_output=True, text=True, timeout=10).stdout.strip() == "OK"
    stats = f"http://127.0.0.1:{api_port}/streammanager/api/2.0/event/live/demo/stats"
    wait_until(lambda: requests.get(stats, timeout=2).json().get("currentSubscribers") == 1, 3,
               what="the viewer in the stats")

    proc.signal(signal.SIGINT)
    assert proc.popen.wait(30) == 0
    time.sleep(0.5)
    for pid in children:
        assert subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
                              ).stdout.strip() in ("", "Z"), f"pid {pid} still running"
    assert "nothing is left running" in proc.log()
