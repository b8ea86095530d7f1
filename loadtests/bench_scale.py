"""``make bench-scale``: how fast the autoscaler reacts, and what one decision step costs.

1. reaction: a region's edges cross the scale-out threshold (viewers join through the agents' hooks) ->
   a new edge is in service (registered, lookups may answer it), with the ``local`` provider launching
   real node agents (``--media nginx`` by default). Median over RUNS. Target: under 10 s.
2. run_once: one controller decision step (read groups, plan, carry out) over 1000 registered nodes with
   their instance records in 10 regions, against a real ZooKeeper, in steady state. Median and p95 over
   many steps; the pure plan alone is reported beside it. Target: under 50 ms.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammanager import autoscaler  # noqa: E402
from streammanager.cloud import build_providers  # noqa: E402
from streammanager.config import ControllerSettings  # noqa: E402
from streammanager.controller import Controller  # noqa: E402
from streammanager.groups import INSERVICE, InstanceRecord, NodeGroup  # noqa: E402
from streammanager.models import NodeRecord, StreamLoad  # noqa: E402
from streammanager.registry import ZkPaths, ensure_layout, make_client, now_ms  # noqa: E402
from streammanager.scaling_store import GroupStore, read_instances  # noqa: E402
from streammanager.zookeeper import ZooKeeperConfig, ZooKeeperServer, free_port  # noqa: E402

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1", "ap-southeast-1",
           "ap-south-1", "sa-east-1", "ca-central-1", "af-south-1")


def group_doc(name: str, regions, edge: tuple[int, int], origin: tuple[int, int] | None, media: str,
              capacity_edge: int) -> dict:
    pools = {"edge": {"min": edge[0], "max": edge[1], "increment": 1}}
    if origin:
        pools["origin"] = {"min": origin[0], "max": origin[1], "increment": 1}
    return {"name": name, "launchConfig": {"provider": "local", "media": media,
                                           "capacity": {"origin": 50, "edge": capacity_edge}},
            "regions": {r: pools for r in regions},
            "scalePolicy": {"scaleOutAt": 0.6, "scaleInBelow": 0.2, "evaluationIntervalS": 1, "warmUpS": 2,
                            "coolDownS": 600, "drainTimeoutS": 60, "bootTimeoutS": 60}}


def hook(node: NodeRecord, call: str, name: str, clientid: str, **extra) -> None:
    response = requests.post(f"{node.agent_url}/hooks/nginx", timeout=5, data={
        "call": call, "app": "live", "name": name, "clientid": clientid, "addr": "127.0.0.1", **extra})
    response.raise_for_status()


def measure_reaction(zk_hosts: str, work: Path, runs: int, media: str) -> list[float]:
    times = []
    for run in range(runs):
        root = f"/bench-scale-{run}-{time.time_ns()}"
        settings = ControllerSettings(zk_hosts=zk_hosts, zk_root=root, cluster_id=f"bench-{run}", tick_s=0.2,
                                      local_state_dir=str(work / f"cloud-{run}"), local_http_port=free_port(),
                                      local_agent_args="--log-format text --report-interval-s 0.5",
                                      log_format="text")
        client = make_client(zk_hosts)
        client.start(timeout=10)
        paths = ZkPaths(root)
        ensure_layout(client, paths)
        GroupStore(client, paths).create(NodeGroup.from_api(group_doc("bench", ["us-east-1"], (1, 3), (1, 1),
                                                                       media, 4)))
        providers = build_providers(settings)
        controller = Controller(settings, providers)
        stop = threading.Event()
        thread = threading.Thread(target=controller.run, args=(stop,), daemon=True)
        thread.start()
        try:
            view = controller.view

            def in_service(role: str) -> list[NodeRecord]:
                return [n for n in view.nodes() if n.role == role and n.state == "inservice"]

            deadline = time.monotonic() + 60
            while len(in_service("edge")) < 1 or len(in_service("origin")) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the group did not come up")
                time.sleep(0.1)
            origin, edge = in_service("origin")[0], in_service("edge")[0]
            hook(origin, "publish", "s1", "pub", type="live")
            time.sleep(1.0)
            crossed = time.monotonic()
            for i in range(3):  # 3 of 4 seats: 0.75 >= 0.6
                hook(edge, "play", "s1", f"v{i}")
            while len(in_service("edge")) < 2:
                if time.monotonic() - crossed > 60:
                    raise RuntimeError("no scale-out within 60 s")
                time.sleep(0.02)
            elapsed = time.monotonic() - crossed
            times.append(elapsed)
            print(f"  run {run + 1}/{runs}: threshold crossed -> new edge in service in {elapsed:.2f} s",
                  flush=True)
        finally:
            stop.set()
            thread.join(20)
            for provider in build_providers(settings).values():
                for instance in provider.list_instances(settings.cluster_id):
                    provider.destroy(instance.id, settings.cluster_id)
            client.stop()
            client.close()
    return times


def measure_run_once(zk_hosts: str, work: Path, nodes: int, steps: int) -> tuple[list[float], list[float]]:
    root = f"/bench-run-once-{time.time_ns()}"
    paths = ZkPaths(root)
    client = make_client(zk_hosts, timeout_s=10)
    client.start(timeout=10)
    ensure_layout(client, paths)
    per_pool = nodes // (2 * len(REGIONS))
    group = NodeGroup.from_api(group_doc("big", REGIONS, (1, per_pool * 2), (1, per_pool * 2), "none", 200))
    GroupStore(client, paths).create(group)
    now = now_ms()
    print(f"  writing {nodes} node records and instance records ...", flush=True)
    records = {}
    for i in range(nodes):
        region = REGIONS[i % len(REGIONS)]
        role = "edge" if (i // len(REGIONS)) % 2 == 0 else "origin"
        node_id = f"big-{region}-{role}-{i:05d}"
        capacity = 200 if role == "edge" else 2  # steady: edges at 0.4, origins at 0.5
        load = {f"live/s{i}": StreamLoad(subscribers=80 if role == "edge" else 0, relays=1 if role == "origin" else 0,
                                         publishing=True, start_ms=now)}
        host = f"127.0.{100 + i // 250}.{i % 250 + 1}"  # data only: nothing connects to these nodes
        record = NodeRecord(node_id, "big", region, role, host, 1935, f"http://{host}:8090", capacity,
                            streams=load, updated_ms=now, started_ms=now)
        client.create(paths.node(node_id), record.to_json(), ephemeral=True)
        instance = InstanceRecord(node_id, "big", region, role, "local", INSERVICE, provider_id=node_id,
                                  created_ms=now - 3_600_000, state_since_ms=now - 3_600_000,
                                  registered_ms=now - 3_600_000)
        client.create(paths.instance(node_id), instance.to_json())
        records[node_id] = (record, instance)
    settings = ControllerSettings(zk_hosts=zk_hosts, zk_root=root, cluster_id="bench-big", tick_s=3600,
                                  sweep_interval_s=3600, local_state_dir=str(work / "cloud-big"), log_format="text")
    controller = Controller(settings, build_providers(settings))
    controller.client.start(timeout=10)
    controller.view.start()
    controller.view.wait_initialized(60)
    controller.instances.start()
    controller._last_sweep = time.monotonic()
    while controller.view.node_count() < nodes:
        time.sleep(0.1)
    full, pure = [], []
    nodes_by_id = {r.id: r for r, _ in records.values()}
    instances = {i.id: i for _, i in records.values()}
    for step in range(steps):
        t0 = time.perf_counter()
        decided = controller.run_once(now_ms() + step * 1100)
        full.append((time.perf_counter() - t0) * 1000)
        if not decided.empty:
            raise RuntimeError(f"steady state expected, the plan acts: {decided}")
        t0 = time.perf_counter()
        autoscaler.plan(now_ms(), [group], instances, nodes_by_id, {})
        pure.append((time.perf_counter() - t0) * 1000)
    assert len(read_instances(client, paths)) == nodes
    controller.instances.close()
    controller.view.close()
    controller.client.stop()
    controller.client.close()
    client.stop()
    client.close()
    return full, pure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--media", choices=("nginx", "none"), default="nginx")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        zk = ZooKeeperServer(ZooKeeperConfig(data_dir=work / "zk", port=free_port(), tick_ms=500, heap_mb=512))
        zk.start()
        try:
            print(f"reaction: threshold crossed -> new edge in service (local provider, media {args.media})")
            reaction = measure_reaction(zk.hosts, work, args.runs, args.media)
            print(f"run_once: {args.nodes} nodes in {len(REGIONS)} regions, {args.steps} steps")
            full, pure = measure_run_once(zk.hosts, work, args.nodes, args.steps)
        finally:
            zk.stop()
    full.sort()
    print(f"scale_out_to_inservice_s median={statistics.median(reaction):.2f} max={max(reaction):.2f} "
          f"runs={len(reaction)} target=10")
    print(f"run_once_ms nodes={args.nodes} regions={len(REGIONS)} median={statistics.median(full):.1f} "
          f"p95={full[int(0.95 * (len(full) - 1))]:.1f} plan_only_median={statistics.median(pure):.1f} target=50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
