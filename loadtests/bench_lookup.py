"""``make bench``: lookup throughput against the registry size.

For each case: a fresh ZooKeeper, ``streammanager serve`` with its production settings (gunicorn,
2 asyncio workers), a fleet of simulated nodes in 4 regions heartbeating like agents, and
live streams. Simulated nodes write their records the way agents do (a heartbeat every 60 s, plus a
write whenever their load changes: 0.1 changes per node per second by default; ``--heartbeat-s 1
--changes-per-node-s 1`` is the worst case of every node changing every second). wrk runs random subscribe lookups (random stream, random region), then ``/healthz`` of
the same server as the ceiling, its requests built by the same Lua code (wrk's cost per request is the
same in both runs). One line per case:

    nodes=10 streams=100 ... lookup_rps=... ceiling_rps=... ratio=... p99_ms=...
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.fleet import Fleet  # noqa: E402
from streammanager.zookeeper import ZooKeeperConfig, ZooKeeperServer, free_port  # noqa: E402

CASES = ((10, 100), (100, 10_000), (1000, 100_000))
HERE = Path(__file__).resolve().parent
LOOKUP_LUA = HERE / "wrk_subscribe.lua"  # with TARGET=healthz: the ceiling, at the same cost to wrk


def run_wrk(url: str, connections: int, duration_s: int, script: Path | None, env: dict) -> tuple[float, float]:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "5s"]
    if script:
        argv += ["-s", str(script)]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration_s + 60,
                         env={**os.environ, **env}).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"  warning: {non2xx.group(1)} non-2xx answers", flush=True)
    return rps, float(p99.group(1)) * scale


def worker_rss_mb(master_pid: int) -> list[float]:
    out = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True).stdout
    sizes = []
    for pid in out.split():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return sizes


def bench_case(nodes: int, streams: int, duration_s: int, connections: int, work: Path,
               heartbeat_s: float = 60.0, changes_per_node_s: float = 0.1, rounds: int = 3) -> str:
    zk = ZooKeeperServer(ZooKeeperConfig(data_dir=work / f"zk-{nodes}", port=free_port(), heap_mb=1024))
    zk.start()
    fleet = None
    api = None
    try:
        root = "/bench"
        fleet = Fleet(zk.hosts, root, nodes, streams, heartbeat_s=heartbeat_s,
                      changes_per_s=changes_per_node_s * nodes)
        fleet.start(progress=lambda line: print(line, flush=True))
        port = free_port()
        env = {**os.environ, "SM_ZK_HOSTS": zk.hosts, "SM_ZK_ROOT": root, "SM_BIND": f"127.0.0.1:{port}",
               "SM_LOG_LEVEL": "WARNING"}
        api = subprocess.Popen([str(Path(sys.executable).parent / "streammanager"), "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = requests.get(f"{url}/healthz", timeout=2).json()
                if health.get("liveStreams") == streams and health.get("nodes") == nodes:
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError("the API server did not load the registry")
            time.sleep(0.2)
        # both workers loaded: ask a few times so each worker answers at least once
        for _ in range(20):
            requests.get(f"{url}/healthz", timeout=2)
        wrk_env = {"STREAMS": str(streams), "REGIONS": ",".join(fleet.regions)}
        run_wrk(f"{url}/healthz", connections, 2, None, wrk_env)  # warm-up
        # Interleaved rounds, medians reported: this machine's neighbours make single runs swing.
        lookups, ceilings, p99s, ceiling_p99s = [], [], [], []
        for _ in range(rounds):
            rps, p99 = run_wrk(f"{url}/", connections, duration_s, LOOKUP_LUA, wrk_env)
            lookups.append(rps)
            p99s.append(p99)
            rps, p99 = run_wrk(f"{url}/", connections, duration_s, LOOKUP_LUA, {**wrk_env, "TARGET": "healthz"})
            ceilings.append(rps)
            ceiling_p99s.append(p99)
        lookup_rps, ceiling_rps, p99, ceiling_p99 = (statistics.median(v)
                                                      for v in (lookups, ceilings, p99s, ceiling_p99s))
        rss = worker_rss_mb(api.pid)
        return (f"nodes={nodes} streams={streams} connections={connections} rounds={rounds} "
                f"heartbeat_s={heartbeat_s:g} changes_per_node_s={changes_per_node_s:g} "
                f"worker_rss_mb={max(rss) if rss else 0:.0f} ceiling_p99_ms={ceiling_p99:.1f} "
                f"lookup_rps={lookup_rps:.0f} ceiling_rps={ceiling_rps:.0f} "
                f"ratio={lookup_rps / ceiling_rps:.2f} p99_ms={p99:.1f}")
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                api.kill()
        if fleet is not None:
            fleet.stop()
        zk.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run [5]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved lookup/ceiling rounds [3]")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections [50]")
    parser.add_argument("--heartbeat-s", type=float, default=60.0,
                        help="an unchanged node record is rewritten this often, like an agent's [60]")
    parser.add_argument("--changes-per-node-s", type=float, default=0.1,
                        help="load changes (a viewer joins or leaves) per node per second [0.1]")
    parser.add_argument("--case", action="append", default=None, metavar="NODES:STREAMS",
                        help="run only these cases (repeatable), e.g. 10:100")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: run 'make setup'", file=sys.stderr)
        return 2
    cases = [tuple(int(x) for x in c.split(":")) for c in args.case] if args.case else CASES
    work = Path(tempfile.mkdtemp(prefix="sm-bench-"))
    try:
        for nodes, streams in cases:
            print(f"case nodes={nodes} streams={streams}: setting up", flush=True)
            print(bench_case(nodes, streams, args.duration, args.connections, work, args.heartbeat_s,
                             args.changes_per_node_s, args.rounds), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
