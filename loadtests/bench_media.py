"""``make bench-media``: the media plane, measured with real nginx-rtmp and ffmpeg on loopback.

For each relay mode (ffmpeg, the default, and nginx-rtmp's own pull): the median over RUNS of
- cold: a subscribe lookup to the first video frame at a player on an edge that does not carry the stream:
  delivered to the player (cold_first_frame_s: what the system controls) and decoded by it
  (cold_first_decoded_s: adds ffmpeg's own probing, which reads about 40 frames before it decodes one),
- warm: the same for a player joining an edge that already relays it; warm_lowlatency_decoded_s is the
  same join by a player set up for low latency (ffmpeg with ``-fpsprobesize 0 -tcp_nodelay 1``: no
  frame-rate probing, Nagle off), as low-latency players are; the default player's numbers stay the
  headline,
- relay_cpu: CPU share of one relay over 10 s (ffmpeg: the relay process; nginx: the edge's nginx),
- failover_gap: a viewer's gap in frames when its stream's origin is killed and the broadcaster
  republishes through a new broadcast lookup (includes the registry noticing the dead origin).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammanager.localcluster import LocalCluster, NodeSpec  # noqa: E402
from streammanager.zookeeper import free_port  # noqa: E402

API = "/streammanager/api/2.0"
PUBLISH = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=size=640x360:rate=30",
           "-f", "lavfi", "-i", "sine", "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency",
           "-pix_fmt", "yuv420p", "-g", "30", "-c:a", "aac", "-f", "flv"]


def lookup(cluster: LocalCluster, name: str, action: str) -> dict:
    return requests.get(f"{cluster.api_url}{API}/event/live/{name}", params={"action": action,
                        "region": "us-east-1"}, timeout=5).json()


def wait_live(cluster: LocalCluster, name: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while requests.get(f"{cluster.api_url}{API}/event/live/{name}/stats", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not go live")
        time.sleep(0.05)


# ffmpeg's trace of each FLV tag it reads: a video tag (type 9) larger than a sequence header is a frame
VIDEO_TAG = re.compile(r"\[flv @ [^]]+\] type:9, size:(\d+),")


# A player tuned for a fast start: decode from the first frames instead of probing the frame rate over
# ~40 frames (FLV's 1 ms time base doubles ffmpeg's probe), and no Nagle delays in the RTMP exchange.
LOW_LATENCY_PLAYER = ("-fpsprobesize", "0", "-tcp_nodelay", "1")


def first_frame_s(cluster: LocalCluster, name: str, procs: list, keep_playing: bool = False,
                  player_args: tuple[str, ...] = ()) -> tuple[float, float]:
    """From the subscribe lookup to (the first video frame delivered to the player, the player's first
    decoded frame). The first is what the edge controls; the second adds ffmpeg's own probing of the
    stream (its defaults read about 40 frames before it decodes any). With ``keep_playing`` the player
    goes on playing afterwards, as a viewer does."""
    started = time.monotonic()
    edge = lookup(cluster, name, "subscribe")["rtmpUrl"]
    player = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "trace", *player_args, "-i", edge, "-t", "120", "-f", "null",
                               "-", "-progress", "pipe:1", "-stats_period", "0.02"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(player)
    delivered: list[float] = []

    def watch_tags() -> None:
        for line in player.stderr:
            if not delivered:
                found = VIDEO_TAG.search(line)
                if found and int(found.group(1)) > 100:
                    delivered.append(time.monotonic() - started)
        # keep draining: a full pipe would stall the player

    reader = threading.Thread(target=watch_tags, daemon=True)
    reader.start()
    deadline = started + 30
    for line in player.stdout:
        if line.startswith("frame=") and int(line.split("=", 1)[1]) >= 1:
            decoded = time.monotonic() - started
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no frame from {edge} within 30 s")
    else:
        raise RuntimeError(f"the player of {edge} ended without a frame")
    if not keep_playing:
        player.kill()
    return (delivered[0] if delivered else float("nan")), decoded


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int, name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def bench_mode(relay: str, runs: int, work: Path) -> str:
    nodes = [NodeSpec("origin", "us-east-1", "127.0.1.201", free_port(), 50),
             NodeSpec("origin", "us-east-1", "127.0.1.202", free_port(), 50),
             NodeSpec("edge", "us-east-1", "127.0.1.203", free_port(), 200)]
    cluster = LocalCluster(work_dir=work / relay, nodes=nodes, api_port=free_port(), zk_port=free_port(),
                           media="nginx", agent_args=("--relay", relay))
    procs: list[subprocess.Popen] = []
    try:
        cluster.start(progress=lambda line: None)
        cold, warm, quick = [], [], []
        # Viewers join at any point of the publisher's 1 s GOP, and a player's first frame waits for the
        # next keyframe: a random pause before each join keeps fixed sleeps from locking the phase.
        phase = random.Random(7)
        for run in range(runs):
            # Each join sees the same machine: the previous run's encoder and viewer stop first (nine
            # x264 encoders left running saturated the 2 cores and slowed every later cold join). The
            # last run's stay up for the relay's CPU measurement.
            stop_all(procs)
            name = f"{relay}{run}"
            origin = lookup(cluster, name, "broadcast")["rtmpUrl"]
            procs.append(subprocess.Popen(PUBLISH + ["-t", "120", origin], stdin=subprocess.DEVNULL))
            wait_live(cluster, name)
            time.sleep(1.0 + phase.random())  # an encoder running a moment, as a viewer would find it
            cold.append(first_frame_s(cluster, name, procs, keep_playing=True))
            time.sleep(2.0 + phase.random())
            warm.append(first_frame_s(cluster, name, procs))
            time.sleep(phase.random())
            quick.append(first_frame_s(cluster, name, procs, player_args=LOW_LATENCY_PLAYER))
            print(f"  {relay} run {run + 1}: first frame delivered / decoded: cold {cold[-1][0]:.2f} / "
                  f"{cold[-1][1]:.2f} s, warm {warm[-1][0]:.2f} / {warm[-1][1]:.2f} s, "
                  f"warm low-latency player {quick[-1][0]:.2f} / {quick[-1][1]:.2f} s", flush=True)

        edge_agent = cluster.agent_pid(nodes[2].node_id)
        # the last run's stream is the only one still relayed: its relay is the edge's newest ffmpeg
        # (nginx: the edge's nginx, which pulls it and serves its viewer)
        measured = sorted(children(edge_agent, "ffmpeg"))[-1:] if relay == "ffmpeg" else children(edge_agent, "nginx")
        before = cpu_seconds(measured[0])
        time.sleep(10)
        relay_cpu = (cpu_seconds(measured[0]) - before) / 10

        gap = failover_gap(cluster, nodes, procs)
        return (f"relay={relay} runs={runs} cold_first_frame_s={statistics.median(c[0] for c in cold):.2f} "
                f"warm_first_frame_s={statistics.median(w[0] for w in warm):.2f} "
                f"cold_first_decoded_s={statistics.median(c[1] for c in cold):.2f} "
                f"warm_first_decoded_s={statistics.median(w[1] for w in warm):.2f} "
                f"warm_lowlatency_decoded_s={statistics.median(q[1] for q in quick):.2f} "
                f"relay_cpu_pct={relay_cpu * 100:.2f} "
                f"failover_gap_s={gap:.2f}")
    finally:
        stop_all(procs)
        cluster.stop()


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
    procs.clear()


def failover_gap(cluster: LocalCluster, nodes: list[NodeSpec], procs: list) -> float:
    name = "failover"
    origin = lookup(cluster, name, "broadcast")
    publisher = subprocess.Popen(PUBLISH + ["-t", "120", origin["rtmpUrl"]], stdin=subprocess.DEVNULL)
    procs.append(publisher)
    wait_live(cluster, name)
    progress = Path(tempfile.mkstemp(suffix=".progress")[1])
    edge = lookup(cluster, name, "subscribe")["rtmpUrl"]
    procs.append(subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", edge, "-t", "120", "-f", "null",
                                   "-", "-progress", str(progress), "-stats_period", "0.1"], stdin=subprocess.DEVNULL))

    def frames() -> int:
        found = re.findall(r"frame=(\d+)", progress.read_text())
        return int(found[-1]) if found else 0

    while frames() < 60:
        time.sleep(0.1)
    dead = next(n for n in nodes if n.host == origin["serverAddress"])
    killed_at = time.monotonic()
    cluster.kill_agent(dead.node_id)
    publisher.send_signal(signal.SIGKILL)
    last = frames()
    while lookup(cluster, name, "broadcast")["serverAddress"] == dead.host:  # the encoder asks again
        time.sleep(0.1)
    procs.append(subprocess.Popen(PUBLISH + ["-t", "60", lookup(cluster, name, "broadcast")["rtmpUrl"]],
                                  stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while frames() <= last + 1:
        if time.monotonic() > deadline:
            return float("inf")
        time.sleep(0.05)
    return time.monotonic() - killed_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="joins measured per mode (random GOP phase each) [9]")
    parser.add_argument("--relay", action="append", choices=("ffmpeg", "nginx"), default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sm-bench-media-"))
    for relay in args.relay or ["ffmpeg", "nginx"]:
        print(f"relay mode {relay}:", flush=True)
        print(bench_mode(relay, args.runs, work), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
