"""The ``local`` cloud: a libcloud driver whose instances are node agents running on this machine.

An instance is a ``node-agent`` process (with its own nginx, or ``--media none``) bound to its own
loopback address from a pool (127.0.1.x), so every instance has a distinct serverAddress on the
standard ports, like a VM would. Like a VM, an instance outlives the controller that launched it: the
agent runs in its own session, and the driver keeps each instance's facts (pid, address, tags) in a
state directory, so any controller on this machine (the next leader) can list and destroy it.
Destroying stops the agent by PID (SIGTERM, a deadline, then SIGKILL to its process group).

The boot script of a launch request is stored beside the instance (for inspection) but not run: it
installs packages, which a local process does not need.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

from streammanager.cloud.base import (
    TAG_CLUSTER,
    TAG_GROUP,
    TAG_REGION,
    TAG_ROLE,
    CloudProvider,
    Instance,
    LaunchRequest,
    ProviderError,
)

log = logging.getLogger(__name__)

DEFAULT_POOL = "127.0.1.64/26"  # 127.0.1.64 .. 127.0.1.127 (tests and the demo's fixed nodes use others)


def address_pool(spec: str) -> list[str]:
    """``127.0.1.64/26`` or ``127.0.1.64-127.0.1.90``: loopback addresses only."""
    if "-" in spec:
        first, last = (ipaddress.IPv4Address(part.strip()) for part in spec.split("-", 1))
        addresses = [ipaddress.IPv4Address(n) for n in range(int(first), int(last) + 1)]
    else:
        net = ipaddress.IPv4Network(spec, strict=False)
        addresses = list(net.hosts()) if net.num_addresses > 2 else list(net)
    if not addresses or not all(a.is_loopback for a in addresses):
        raise ValueError(f"address pool {spec!r} must be a non-empty range of loopback addresses")
    return [str(a) for a in addresses]


# the controller's own secrets and settings, which a node agent has no use for: a cloud VM's agent sees
# only its boot script's environment, and a local one saw the controller's whole environment (the EC2
# secret key, the event callback credentials, the admin token) in its /proc/<pid>/environ
CONTROLLER_ONLY_PREFIXES = ("SM_", "AWS_", "GOOGLE_", "EVENT_CALLBACK_", "COMMANDS_API_")
PASSED_TO_AGENTS = ("SM_MEDIA_ROOT",)  # the one SM_ setting agents read too (the shared media directory)


def agent_environment(environ) -> dict[str, str]:
    """What of the controller's environment a local node agent gets."""
    return {name: value for name, value in environ.items()
            if name in PASSED_TO_AGENTS or not name.startswith(CONTROLLER_ONLY_PREFIXES)}


# SIGTERM, then SIGKILL this much later: an agent's own stop ends within 20 s (node_agent.cli.STOP_DEADLINE_S),
# an origin's after up to 10 s of ending its publish sessions (their VOD, HLS-VOD, stream-closed)
AGENT_STOP_S = 25.0


class LocalNodeDriver(NodeDriver):
    """libcloud driver: ``create_node`` starts a node agent, ``list_nodes`` reads the state directory,
    ``destroy_node`` stops it. Provider-specific arguments are ``ex_``-prefixed."""

    type = "sm-local"
    name = "streammanager local processes"
    website = "https://github.com/streammanager"
    features = {"create_node": []}

    def __init__(self, state_dir: str | os.PathLike, zk_hosts: str, zk_root: str,
                 pool: str = DEFAULT_POOL, http_port: int = 8090, agent_args: tuple[str, ...] = (),
                 agent_bin: str | None = None, stop_timeout_s: float = AGENT_STOP_S, zk_auth: str | None = None):
        super().__init__(key="local")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.zk_hosts = zk_hosts
        self.zk_root = zk_root
        self.zk_auth = zk_auth
        self.pool = address_pool(pool)
        self.http_port = http_port
        self.agent_args = tuple(agent_args)
        self.agent_bin = agent_bin or str(Path(sys.executable).parent / "node-agent")
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[int, subprocess.Popen] = {}  # ours, to reap

    # -- libcloud interface ------------------------------------------------------------------------
    def list_sizes(self, location=None) -> list[NodeSize]:
        return [NodeSize("process", "one node agent process", 0, 0, 0, 0.0, self)]

    def list_images(self, location=None, ex_only_active=True) -> list[NodeImage]:
        return [NodeImage("node-agent", "node-agent of this installation", self)]

    def list_locations(self) -> list[NodeLocation]:
        return [NodeLocation("loopback", "this machine", "local", self)]

    def create_node(self, name: str, size: NodeSize | None = None, image: NodeImage | None = None,
                    location=None, ex_tags: dict[str, str] | None = None, ex_userdata: str = "",
                    ex_capacity: int = 100, ex_media: str = "none") -> Node:
        tags = dict(ex_tags or {})
        for required in (TAG_GROUP, TAG_REGION, TAG_ROLE):
            if not tags.get(required):
                raise ValueError(f"a local instance needs the tag {required}")
        with self._locked():
            if (self.state_dir / f"{name}.json").exists():
                raise ValueError(f"an instance named {name} exists")
            host = self._free_address()
            work_dir = self.state_dir / name
            work_dir.mkdir(parents=True, exist_ok=True)
            # the controller renders the cluster's ZooKeeper password into it (${zk_auth}): the owner's only,
            # like a VM's user data (it was readable by every local user)
            script = os.open(work_dir / "boot-script.sh", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(script, 0o600)  # a script left by an earlier instance of the name kept its mode
            with open(script, "w") as out:
                out.write(ex_userdata)
            argv = [self.agent_bin, "--role", tags[TAG_ROLE], "--region", tags[TAG_REGION],
                    "--group", tags[TAG_GROUP], "--host", host, "--http-port", str(self.http_port),
                    "--capacity", str(ex_capacity), "--media", ex_media, "--node-id", name,
                    "--work-dir", str(work_dir), *self.agent_args]
            env = {**agent_environment(os.environ), "AGENT_ZK_HOSTS": self.zk_hosts, "AGENT_ZK_ROOT": self.zk_root,
                   "AGENT_ZK_AUTH": self.zk_auth or ""}
            # the facts are on disk before the agent runs: a controller that died between starting the agent
            # and writing them left an agent no controller could list, adopt or destroy (registered for good)
            facts = {"id": name, "name": name, "pid": 0, "host": host, "tags": tags,
                     "created_ms": int(time.time() * 1000), "argv": argv}
            self._write(name, facts)
            with open(work_dir / "agent.log", "ab") as out:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            self._children[proc.pid] = proc
            facts["pid"] = proc.pid
            self._write(name, facts)
        log.info("local instance %s started: agent pid %d on %s", name, proc.pid, host,
                 extra={"node_id": name, "region": tags[TAG_REGION], "role": tags[TAG_ROLE]})
        return self._node(facts)

    def list_nodes(self) -> list[Node]:
        self._reap()
        nodes = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                facts = self._with_pid(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being written or removed
            nodes.append(self._node(facts))
        return nodes

    def destroy_node(self, node: Node) -> bool:
        path = self.state_dir / f"{node.id}.json"
        try:
            facts = self._with_pid(json.loads(path.read_text()))
        except FileNotFoundError:
            return False
        pid = int(facts["pid"])
        if self._alive(pid, facts["id"]) and not self._stop(pid, facts["id"]):
            # its facts stay: the instance is still there, and a later destroy tries again
            raise ProviderError(f"local instance {facts['id']} (pid {pid}) survived SIGKILL")
        path.unlink(missing_ok=True)
        log.info("local instance %s destroyed", facts["id"], extra={"node_id": facts["id"]})
        return True

    # -- helpers -------------------------------------------------------------------------------------
    def _with_pid(self, facts: dict) -> dict:
        """Facts written before their agent was started have no pid (0): a controller that died right after
        starting it never wrote it. The agent is found by its exact command line, and its pid recorded."""
        if facts.get("pid") or not facts.get("argv"):
            return facts
        wanted = [str(a).encode() for a in facts["argv"]]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if argv == wanted or argv[1:] == wanted:  # a console script runs as ``python <script> args``
                facts = {**facts, "pid": int(entry.name)}
                with self._locked():
                    if (self.state_dir / f"{facts['name']}.json").exists():
                        self._write(facts["name"], facts)
                return facts
        return facts

    def _node(self, facts: dict) -> Node:
        alive = self._alive(int(facts["pid"]), facts["id"])
        return Node(id=facts["id"], name=facts["name"],
                    state=NodeState.RUNNING if alive else NodeState.TERMINATED,
                    public_ips=[facts["host"]], private_ips=[facts["host"]], driver=self,
                    extra={"tags": facts["tags"], "pid": facts["pid"], "created_ms": facts["created_ms"],
                           "agent_url": f"http://{facts['host']}:{self.http_port}"})

    def _alive(self, pid: int, name: str) -> bool:
        self._reap()
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                return False
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return name.encode() in f.read().split(b"\0")  # not a recycled pid
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def _stop(self, pid: int, name: str) -> bool:
        """SIGTERM, then SIGKILL: whether the process is gone."""
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not self._alive(pid, name):
                    return True
                time.sleep(0.05)
        log.error("local instance %s (pid %d) survived SIGKILL", name, pid)
        return False

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                self._children.pop(pid, None)  # calls run in several threads (the controller's actions)

    def _free_address(self) -> str:
        used = set()
        for path in self.state_dir.glob("*.json"):
            try:
                used.add(json.loads(path.read_text())["host"])
            except (OSError, ValueError, KeyError):
                continue
        for host in self.pool:
            if host not in used and _ports_free(host, (self.http_port, 1935)):
                return host
        raise ValueError(f"no free address left in the local pool ({len(self.pool)} addresses)")

    def _write(self, name: str, facts: dict) -> None:
        tmp = self.state_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(facts))
        tmp.replace(self.state_dir / f"{name}.json")

    @contextmanager
    def _locked(self):
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _ports_free(host: str, ports: tuple[int, ...]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class LocalProvider(CloudProvider):
    name = "local"

    def __init__(self, driver: LocalNodeDriver):
        self.driver = driver

    def launch(self, request: LaunchRequest) -> Instance:
        try:
            node = self.driver.create_node(request.name, ex_tags=request.tags(), ex_userdata=request.boot_script,
                                           ex_capacity=request.capacity, ex_media=request.media)
        except (ValueError, OSError) as exc:
            raise ProviderError(f"local launch of {request.name} failed: {exc}") from exc
        return self._instance(node)

    def list_instances(self, cluster_id: str) -> list[Instance]:
        return [self._instance(n) for n in self.driver.list_nodes()
                if n.extra["tags"].get(TAG_CLUSTER) == cluster_id]

    def destroy(self, instance_id: str, cluster_id: str) -> bool:
        node = next((n for n in self.driver.list_nodes() if n.id == instance_id), None)
        if node is None:
            return False
        if node.extra["tags"].get(TAG_CLUSTER) != cluster_id:
            raise ProviderError(f"instance {instance_id} does not belong to cluster {cluster_id}")
        return self.driver.destroy_node(node)

    @staticmethod
    def _instance(node: Node) -> Instance:
        tags = node.extra["tags"]
        return Instance(id=node.id, name=node.name, state=str(node.state), cluster_id=tags.get(TAG_CLUSTER, ""),
                        group=tags.get(TAG_GROUP, ""), region=tags.get(TAG_REGION, ""),
                        role=tags.get(TAG_ROLE, ""), address=node.public_ips[0] if node.public_ips else None,
                        extra={"pid": node.extra["pid"], "agent_url": node.extra["agent_url"],
                               "created_ms": node.extra["created_ms"]})
