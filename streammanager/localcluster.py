"""A whole cluster on one machine: ZooKeeper, an API server and node agents on loopback addresses.

Used by ``streammanager demo`` and the load test. Every process is a supervised child that dies with
us (PR_SET_PDEATHSIG) and is stopped by ``stop()``: nothing is left running.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from streammanager.process import Supervised
from streammanager.zookeeper import ZooKeeperConfig, ZooKeeperServer, port_is_free

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeSpec:
    role: str
    region: str
    host: str
    http_port: int
    capacity: int

    @property
    def node_id(self) -> str:
        return f"{self.role}-{self.region}-{self.host}"


def default_layout(regions: list[str], base_port: int = 8700) -> list[NodeSpec]:
    """An origin and an edge per region, each on its own 127.0.1.x address."""
    specs = []
    for i, region in enumerate(regions):
        specs.append(NodeSpec("origin", region, f"127.0.1.{2 * i + 1}", base_port + 2 * i, 50))
        specs.append(NodeSpec("edge", region, f"127.0.1.{2 * i + 2}", base_port + 2 * i + 1, 200))
    return specs


@dataclass
class LocalCluster:
    work_dir: Path
    nodes: list[NodeSpec]
    api_port: int = 5080
    zk_port: int = 2181
    media: str = "none"
    access_token: str = "demo-token"
    zk_root: str = "/streammanager"
    agent_args: tuple[str, ...] = ()  # extra node-agent options, e.g. ("--relay", "nginx")
    # a node group for a controller (local provider) to launch, instead of fixed ``nodes``
    group: dict | None = None
    cluster_id: str = "demo"
    fresh_registry: bool = False  # start ZooKeeper empty (the demo: each run is a new cluster)
    agent_http_port: int = 8090  # the controller's local instances' HTTP port (each on its own address)
    _zk: ZooKeeperServer | None = None
    _children: list[Supervised] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def zk_hosts(self) -> str:
        return f"127.0.0.1:{self.zk_port}"

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def start(self, progress=print) -> None:
        for port, what in [(self.api_port, "API"), (self.zk_port, "ZooKeeper")] + [
                (n.http_port, f"agent {n.node_id}") for n in self.nodes]:
            if not port_is_free(port):
                raise ClusterError(f"port {port} for the {what} is in use: is another cluster running?")
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClusterError(f"cannot use the work directory {self.work_dir}: {exc.strerror or exc}") from None
        if self.fresh_registry:
            # the last run's registry (its node group, its instance records) made the next `make demo`
            # fail at once ("node group 'demo' exists"); its ZooKeeper is not running (its port is free)
            shutil.rmtree(self.work_dir / "zookeeper", ignore_errors=True)
        progress(f"starting ZooKeeper on {self.zk_hosts}")
        self._zk = ZooKeeperServer(ZooKeeperConfig(data_dir=self.work_dir / "zookeeper", port=self.zk_port))
        self._zk.start()
        env = {**os.environ, "SM_ZK_HOSTS": self.zk_hosts, "SM_ZK_ROOT": self.zk_root,
               "SM_ACCESS_TOKEN": self.access_token, "SM_BIND": f"127.0.0.1:{self.api_port}",
               "SM_LOG_FORMAT": "text", "AGENT_ZK_HOSTS": self.zk_hosts, "AGENT_ZK_ROOT": self.zk_root,
               "AGENT_LOG_FORMAT": "text", "SM_MEDIA_ROOT": str((self.work_dir / "media").resolve())}
        progress(f"starting the API server on {self.api_url}")
        self._spawn("api", [self._bin("streammanager"), "serve"], env)
        if self.group is not None:
            self._start_controller(env, progress)
        for spec in self.nodes:
            progress(f"starting {spec.role} {spec.node_id} ({spec.region}) on {spec.host}")
            self._spawn(spec.node_id, [
                self._bin("node-agent"), "--role", spec.role, "--region", spec.region, "--host", spec.host,
                "--http-port", str(spec.http_port), "--capacity", str(spec.capacity), "--media", self.media,
                "--node-id", spec.node_id, "--work-dir", str(self.work_dir / spec.node_id), *self.agent_args], env)
        self._wait_ready()

    @property
    def expected_nodes(self) -> int:
        if self.group is None:
            return len(self.nodes)
        return len(self.nodes) + sum(pool["min"] for roles in self.group["regions"].values()
                                     for pool in roles.values())

    def controller_settings(self):
        from streammanager.config import ControllerSettings

        return ControllerSettings(zk_hosts=self.zk_hosts, zk_root=self.zk_root, cluster_id=self.cluster_id,
                                  local_state_dir=str(self.work_dir / "local-cloud"),
                                  local_http_port=self.agent_http_port,
                                  local_agent_args=" ".join(["--log-format", "text", *self.agent_args]))

    def _start_controller(self, env: dict, progress) -> None:
        settings = self.controller_settings()
        progress(f"starting the controller (local provider, instances under {settings.local_state_dir})")
        self._spawn("controller", [self._bin("streammanager"), "controller"], {
            **env, "SM_CLUSTER_ID": settings.cluster_id, "SM_LOCAL_STATE_DIR": settings.local_state_dir,
            "SM_LOCAL_AGENT_ARGS": settings.local_agent_args,
            "SM_LOCAL_HTTP_PORT": str(settings.local_http_port), "SM_CONTROLLER_METRICS_BIND": "off"})
        self._wait_api()
        response = requests.post(f"{self.api_url}/streammanager/api/2.0/admin/nodegroup",
                                 params={"accessToken": self.access_token}, json=self.group, timeout=10)
        if response.status_code != 201:
            raise ClusterError(f"creating node group {self.group.get('name')} failed: {response.text}")
        progress(f"node group {self.group['name']} created: the controller launches "
                 f"{self.expected_nodes - len(self.nodes)} node(s)")

    def _wait_api(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise ClusterError(f"the API did not answer within {timeout_s:.0f} s")

    def _spawn(self, name: str, argv: list[str], env: dict) -> None:
        child = Supervised(name, argv, env=env, log_name=f"cluster.{name}")
        child.start()
        self._children.append(child)

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [c.name for c in self._children if not c.running]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited during start-up; see its output")
            # Every API worker has its own view and its own listening socket, and each new connection
            # may reach any of them: ready means ten answers in a row (ten connections) see every node.
            try:
                expected = self.expected_nodes
                if all(requests.get(f"{self.api_url}/healthz", timeout=1).json().get("nodes") == expected
                       for _ in range(10)):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise ClusterError(f"the cluster did not come up within {timeout_s:.0f} s")

    def agent_pid(self, node_id: str) -> int | None:
        return next((c.pid for c in self._children if c.name == node_id), None)

    def kill_agent(self, node_id: str) -> None:
        """SIGKILL one node's agent (a crash): its media server dies with it."""
        child = next(c for c in self._children if c.name == node_id)
        child.kill()

    def check_alive(self) -> list[str]:
        return [c.name for c in self._children if not c.running]

    def stop(self) -> list[str]:
        """Stop everything; returns the ids of local instances that could not be destroyed (logged)."""
        left: list[str] = []
        for child in reversed(self._children):
            child.stop(10)
        self._children.clear()
        settings = self.controller_settings()
        # the controller's instances outlive it, like VMs: destroy them (none without their state directory:
        # a start that failed before the controller ran must not make one)
        if self.group is not None and Path(settings.local_state_dir).is_dir():
            from streammanager.cloud import build_providers

            doomed = [(provider, instance.id) for provider in build_providers(settings).values()
                      for instance in provider.list_instances(settings.cluster_id)]
            # together: each agent takes about half a second to deregister and stop its media server
            with ThreadPoolExecutor(max_workers=max(1, len(doomed)), thread_name_prefix="destroy") as pool:
                calls = {pool.submit(provider.destroy, i, settings.cluster_id): i for provider, i in doomed}
            for call, instance_id in calls.items():
                if call.exception() is not None:  # the others are gone, and ZooKeeper is stopped all the same
                    log.error("local instance %s could not be destroyed: %s", instance_id, call.exception())
                    left.append(instance_id)
        if self._zk is not None:
            self._zk.stop()
            self._zk = None
        return left
