"""``streammanager demo``: a local cluster and what to type to use it, until Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from streammanager import logs
from streammanager.process import stop_event_on_signals
import requests

from streammanager.localcluster import ClusterError, LocalCluster
from streammanager.zookeeper import ZooKeeperError


def demo_group(regions: list[str], media: str) -> dict:
    """The demo's node group: an origin and an edge per region to start with, room to grow."""
    return {
        "name": "demo",
        "launchConfig": {"provider": "local", "media": media, "capacity": {"origin": 50, "edge": 200}},
        "regions": {r: {"origin": {"min": 1, "max": 2, "increment": 1},
                        "edge": {"min": 1, "max": 3, "increment": 1}} for r in regions},
        "scalePolicy": {"scaleOutAt": 0.6, "scaleInBelow": 0.2, "evaluationIntervalS": 2, "warmUpS": 5,
                        "coolDownS": 30, "drainTimeoutS": 60},
    }


class Node:
    def __init__(self, doc: dict):
        self.role, self.region, self.host = doc["role"], doc["region"], doc["serverAddress"]
        self.agent_url = doc["agentUrl"]


def running_nodes(cluster: LocalCluster) -> list[Node]:
    docs = requests.get(f"{cluster.api_url}/streammanager/api/2.0/admin/node",
                        params={"accessToken": cluster.access_token}, timeout=5).json()
    return sorted((Node(d) for d in docs), key=lambda n: (n.region, n.role))


def usage(cluster: LocalCluster, regions: list[str]) -> str:
    api = f"{cluster.api_url}/streammanager/api/2.0"
    first, second = regions[0], regions[-1]
    lines = [
        "",
        "streammanager demo is running:",
        f"  API          {cluster.api_url}   (admin token: {cluster.access_token})",
        f"  ZooKeeper    {cluster.zk_hosts}",
    ]
    nodes = running_nodes(cluster)
    lines += ["  controller   leads node group 'demo' (local provider): grows and shrinks it with the load"]
    lines += [f"  {n.role:<6} {n.region:<14} {n.host}  agent {n.agent_url}" for n in nodes]
    lines += [
        "",
        "Ask where to publish (broadcaster in %s):" % first,
        f"  curl -s '{api}/event/live/demo?action=broadcast&region={first}'",
    ]
    if cluster.media == "none":
        origin = next(n for n in nodes if n.role == "origin" and n.region == first)
        edge = next(n for n in nodes if n.role == "edge" and n.region == second)
        lines += [
            "The nodes are simulated (--media none): publish and play by calling their agents' hooks,",
            "exactly as nginx-rtmp would:",
            f"  curl -s -d call=publish -d app=live -d name=demo -d clientid=1 {origin.agent_url}/hooks/nginx",
            f"Ask where to play (viewer in {second}), then play from that edge:",
            f"  curl -s '{api}/event/live/demo?action=subscribe&region={second}'",
            f"  curl -s -d call=play -d app=live -d name=demo -d clientid=2 {edge.agent_url}/hooks/nginx",
        ]
    else:
        pick = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"rtmpUrl\"])'"
        lines += [
            "Publish a test pattern to the origin the lookup names (Ctrl-C stops it):",
            f"  URL=$(curl -s '{api}/event/live/demo?action=broadcast&region={first}' | {pick})",
            "  ffmpeg -re -f lavfi -i testsrc=size=640x360:rate=30 -f lavfi -i sine -c:v libx264 -preset veryfast "
            "-tune zerolatency -pix_fmt yuv420p -g 30 -c:a aac -f flv \"$URL?key=demo-key\"",
            "  (OBS: Settings > Stream > Custom; Server: the rtmpUrl without /demo; Stream Key: demo?key=demo-key,",
            "   where your application's key goes; Output > Keyframe Interval 1 s: a viewer's first frame waits",
            "   for the next keyframe)",
            f"Play it in {second} from the edge the lookup names (another terminal):",
            f"  URL=$(curl -s '{api}/event/live/demo?action=subscribe&region={second}' | {pick})",
            "  ffplay -fflags nobuffer -fpsprobesize 0 \"$URL\"   # starts in well under a second",
            "  ffmpeg -i \"$URL\" -t 10 -f null -      # without a screen: reads 10 s and counts the frames",
        ]
    lines += [
        "Watch it:",
        f"  {cluster.api_url}/dashboard?accessToken={cluster.access_token}   (in a browser)",
        f"  curl -s {api}/event/list/stats",
        f"  curl -s '{api}/admin/node?accessToken={cluster.access_token}'",
        f"  curl -s '{api}/admin/nodegroup/demo/node?accessToken={cluster.access_token}'",
        f"  curl -s {cluster.api_url}/metrics",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def keep_server_output(work_dir: Path) -> Path | None:
    """The API server's, the controller's and ZooKeeper's output, which the terminal keeps
    quiet about: written to ``cluster.log`` in the work directory, or they were lost (an error at start-up
    said "see the log above", and there was none). None if the directory cannot be used (the cluster's
    start says why)."""
    path = work_dir / "cluster.log"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="w")
    except OSError:
        return None
    handler.setFormatter(logs.TextFormatter())
    for name in ("cluster", "streammanager.zookeeper"):  # and ZooKeeper's
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the terminal shows the demo's own lines and warnings only
    return path


def run_demo(args: argparse.Namespace) -> int:
    logs.configure("WARNING", "text")
    output = keep_server_output(args.work_dir)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if not regions:
        print("streammanager demo: --regions is empty", file=sys.stderr)
        return 2
    cluster = LocalCluster(work_dir=args.work_dir, nodes=[], api_port=args.api_port, zk_port=args.zk_port,
                           media=args.media, group=demo_group(regions, args.media),
                           agent_http_port=args.agent_base_port, fresh_registry=True)
    stop = stop_event_on_signals()
    try:
        cluster.start(progress=lambda line: print(line, flush=True))
        print(usage(cluster, regions), flush=True)
        while not stop.wait(2.0):
            dead = cluster.check_alive()
            if dead:
                print(f"streammanager demo: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
        return 0
    except (ClusterError, ZooKeeperError) as exc:
        print(f"streammanager demo: {exc}" + (f" (the servers' output: {output})" if output else ""),
              file=sys.stderr)
        return 1
    finally:
        print("stopping the demo cluster...", flush=True)
        left = cluster.stop()
        if left:
            print(f"streammanager demo: stopped, but these instances could not be destroyed: {', '.join(left)} "
                  f"(each one's pid is in {args.work_dir}/local-cloud/<id>.json)", file=sys.stderr)
        else:
            print("stopped; nothing is left running.", flush=True)
