"""A fleet of simulated media nodes in one process: what N node agents would write to ZooKeeper.

Each simulated node has an ephemeral node record (the same NodeRecord codec the agent uses), written
like an agent writes it: at least every ``heartbeat_s`` (the agent's heartbeat), and whenever its load
changes; ``changes_per_s`` node records see a viewer join or leave each second. Each live stream has its
ownership znode. Used by the benchmark and the load test, where a thousand agent processes would not fit on
the machine.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

from kazoo.client import KazooClient

from streammanager.models import NodeRecord, StreamKey, StreamLoad, StreamRecord
from streammanager.registry import ZkPaths, ensure_layout, make_client, now_ms

REGIONS = ("us-east-1", "eu-west-1", "ap-northeast-1", "sa-east-1")


def stream_name(i: int) -> str:
    return f"s{i}"


class Fleet:
    def __init__(self, zk_hosts: str, zk_root: str, nodes: int, streams: int, *, regions=REGIONS,
                 heartbeat_s: float = 60.0, changes_per_s: float = 0.0, seed: int = 1, edge_capacity: int = 1_000_000,
                 origin_capacity: int | None = None):
        self.paths = ZkPaths(zk_root)
        self.client: KazooClient = make_client(zk_hosts, timeout_s=10.0)
        self.heartbeat_s = heartbeat_s
        self.changes_per_s = changes_per_s
        self.regions = regions
        self._rng = rng = random.Random(seed + 1)
        origins = max(1, nodes // 2)
        edges = max(1, nodes - origins)
        origin_capacity = origin_capacity or max(50, 2 * streams // origins + 1)
        start = now_ms()
        streams_of: dict[str, dict[str, StreamLoad]] = {}
        self.records: list[NodeRecord] = []
        for i in range(origins):
            streams_of[f"origin-{i}"] = {}
        for i in range(edges):
            streams_of[f"edge-{i}"] = {}
        for s in range(streams):
            key = f"live/{stream_name(s)}"
            streams_of[f"origin-{s % origins}"][key] = StreamLoad(0, 1, True, start)
            streams_of[f"edge-{rng.randrange(edges)}"][key] = StreamLoad(rng.randint(1, 20), 0, True, start)
        for i in range(origins):
            self.records.append(self._record(f"origin-{i}", "origin", regions[i % len(regions)], i,
                                             origin_capacity, streams_of[f"origin-{i}"], start))
        for i in range(edges):
            self.records.append(self._record(f"edge-{i}", "edge", regions[i % len(regions)], origins + i,
                                             edge_capacity, streams_of[f"edge-{i}"], start))
        self.streams = streams
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _record(node_id, role, region, n, capacity, streams, start) -> NodeRecord:
        host = f"127.0.{1 + n // 250}.{n % 250 + 2}"
        return NodeRecord(id=node_id, group="bench", region=region, role=role, host=host, rtmp_port=1935,
                          agent_url=f"http://{host}:8090", capacity=capacity, streams=streams,
                          updated_ms=start, started_ms=start)

    def start(self, progress=print) -> None:
        self.client.start(timeout=30)
        ensure_layout(self.client, self.paths)
        t0 = time.monotonic()
        self._write_all(create=True)
        progress(f"  fleet: {len(self.records)} node records in {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        self._claim_streams()
        progress(f"  fleet: {self.streams} stream claims in {time.monotonic() - t0:.1f} s")
        self._thread = threading.Thread(target=self._heartbeat, name="fleet-heartbeat", daemon=True)
        self._thread.start()

    def _write_all(self, create: bool) -> None:
        now = now_ms()
        self.records = [replace(r, updated_ms=now) for r in self.records]
        self._write(range(len(self.records)), create)
        self._last_write = [time.monotonic()] * len(self.records)

    def _write(self, indexes, create: bool = False) -> None:
        pending = []
        for i in indexes:
            record = self.records[i]
            path = self.paths.node(record.id)
            if create:
                pending.append(self.client.create_async(path, record.to_json(), ephemeral=True, makepath=True))
            else:
                pending.append(self.client.set_async(path, record.to_json()))
            if len(pending) >= 500:
                for p in pending:
                    p.get(timeout=30)
                pending.clear()
        for p in pending:
            p.get(timeout=30)

    def _change_load(self, i: int, now: int) -> None:
        """A viewer joins or leaves one stream of node ``i``."""
        record = self.records[i]
        if record.streams:
            key = self._rng.choice(list(record.streams))
            load = record.streams[key]
            subscribers = max(0, load.subscribers + self._rng.choice((-1, 1)))
            streams = {**record.streams, key: load._replace(subscribers=subscribers)}
            self.records[i] = replace(record, streams=streams, updated_ms=now)
        else:
            self.records[i] = replace(record, updated_ms=now)

    def _claim_streams(self) -> None:
        self.client.ensure_path(f"{self.paths.streams}/live")
        origins = [r for r in self.records if r.role == "origin"]
        now = now_ms()
        for first in range(0, self.streams, 1000):
            tx = self.client.transaction()
            for s in range(first, min(self.streams, first + 1000)):
                record = StreamRecord(origins[s % len(origins)].id, f"bench-{s}", now)
                tx.create(self.paths.stream(StreamKey("live", stream_name(s))), record.to_json(), ephemeral=True)
            tx.commit()

    def _heartbeat(self, tick_s: float = 0.01, heartbeat_check_s: float = 0.25) -> None:
        """Write changed and due records. Agents write independently of each other, so writes are
        spread over the second (a tick of 10 ms) rather than sent in bursts: a burst of a few dozen
        records every quarter second made every API worker and ZooKeeper busy at the same instant."""
        carry = 0.0
        next_check = 0.0
        while not self._stop.wait(tick_s):
            try:
                now, mono = now_ms(), time.monotonic()
                due: set[int] = set()
                if mono >= next_check:
                    next_check = mono + heartbeat_check_s
                    due = {i for i, t in enumerate(self._last_write) if mono - t >= self.heartbeat_s}
                carry += self.changes_per_s * tick_s
                changed = set(self._rng.sample(range(len(self.records)), min(len(self.records), int(carry))))
                carry -= int(carry)
                if not due and not changed:
                    continue
                for i in due | changed:
                    if i in changed:
                        self._change_load(i, now)
                    else:
                        self.records[i] = replace(self.records[i], updated_ms=now)
                    self._last_write[i] = mono
                self._write(sorted(due | changed))
            except Exception as exc:  # a missed write is visible in the results, not fatal
                print(f"  fleet: write failed: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.stop()
        self.client.close()
