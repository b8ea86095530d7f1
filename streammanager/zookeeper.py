"""Run a ZooKeeper server from the Debian package on loopback: standalone, or one member of a local
ensemble. Used by ``streammanager zookeeper``, the demo and the test suite.

The server runs as a child process (plain ``java``, never ``zkServer.sh``: Debian's script ignores the
environment). Client port on 127.0.0.1 only, admin server off, heap capped. The child dies with its
parent (PR_SET_PDEATHSIG), so a killed supervisor leaves no ZooKeeper behind.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from streammanager.process import Supervised

log = logging.getLogger(__name__)

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
SLF4J_SIMPLE_JAR = Path("/usr/share/java/slf4j-simple.jar")


class ZooKeeperError(RuntimeError):
    pass


@dataclass
class ZooKeeperConfig:
    data_dir: Path
    port: int = 2181
    heap_mb: int = 256
    tick_ms: int = 500
    min_session_timeout_ms: int = 1000
    max_session_timeout_ms: int = 40000
    server_id: int | None = None  # set for an ensemble member
    peers: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (quorum port, election port)

    def render(self) -> str:
        lines = [
            f"tickTime={self.tick_ms}",
            f"dataDir={self.data_dir}",
            f"clientPort={self.port}",
            "clientPortAddress=127.0.0.1",
            "admin.enableServer=false",
            f"minSessionTimeout={self.min_session_timeout_ms}",
            f"maxSessionTimeout={self.max_session_timeout_ms}",
            "maxClientCnxns=0",
            "4lw.commands.whitelist=ruok,srvr,mntr,stat",
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
        ]
        if self.peers:
            lines += ["initLimit=10", "syncLimit=5"]
            for sid, (quorum, election) in sorted(self.peers.items()):
                lines.append(f"server.{sid}=127.0.0.1:{quorum}:{election}")
        return "\n".join(lines) + "\n"


def check_installed() -> None:
    if not ZOOKEEPER_JAR.exists():
        raise ZooKeeperError(f"ZooKeeper is not installed ({ZOOKEEPER_JAR} is missing): "
                             "apt-get install zookeeper (or run 'make setup')")
    if shutil.which("java") is None:
        raise ZooKeeperError("java is not on PATH: apt-get install default-jre-headless")


def four_letter(port: int, word: str, timeout_s: float = 1.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(word.encode())
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class ZooKeeperServer:
    """One ZooKeeper process. ``start()`` returns once it serves clients (or raises)."""

    def __init__(self, config: ZooKeeperConfig):
        self.config = config
        self._proc: Supervised | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.config.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self, cfg_path: Path) -> list[str]:
        classpath = [str(ZOOKEEPER_JAR)]
        if SLF4J_SIMPLE_JAR.exists():
            classpath.append(str(SLF4J_SIMPLE_JAR))
        return [
            "java", f"-Xmx{self.config.heap_mb}m", f"-Xms{min(64, self.config.heap_mb)}m",
            "-XX:+UseSerialGC", "-Djute.maxbuffer=8388608", "-Djava.net.preferIPv4Stack=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp", ":".join(classpath),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg_path),
        ]

    def start(self, wait_s: float = 20.0) -> "ZooKeeperServer":
        check_installed()
        if not port_is_free(self.config.port):
            raise ZooKeeperError(f"port 127.0.0.1:{self.config.port} is already in use "
                                 "(another ZooKeeper?): choose another with --port")
        data_dir = Path(self.config.data_dir)
        cfg_path = data_dir / "zoo.cfg"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            if self.config.server_id is not None:
                (data_dir / "myid").write_text(f"{self.config.server_id}\n")
            cfg_path.write_text(self.config.render())
        except OSError as exc:
            raise ZooKeeperError(f"cannot use the data directory {data_dir}: {exc.strerror or exc}") from None
        self._proc = Supervised("zookeeper", self.command(cfg_path), log_name="streammanager.zookeeper")
        self._proc.start()
        if wait_s:
            self.wait_ready(wait_s)
        log.info("zookeeper serving on %s (pid %s)", self.hosts, self.pid)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and not self._proc.running:
                raise ZooKeeperError(f"zookeeper exited with {self._proc.returncode}; see its log above")
            try:
                if self.config.peers:
                    if "Mode:" in four_letter(self.config.port, "srvr"):
                        return
                elif four_letter(self.config.port, "ruok") == "imok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise ZooKeeperError(f"zookeeper did not serve on {self.hosts} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None:
            self._proc.stop(timeout_s)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def wait(self) -> int:
        return self._proc.wait() if self._proc else 0


def ensemble(base_dir: Path, client_ports: list[int], quorum_base: int = 22880,
             election_base: int = 23880, **kw) -> list[ZooKeeperServer]:
    """Servers of a local ensemble (not started)."""
    peers = {i + 1: (quorum_base + i + 1, election_base + i + 1) for i in range(len(client_ports))}
    return [
        ZooKeeperServer(ZooKeeperConfig(data_dir=Path(base_dir) / f"zk{i + 1}", port=port,
                                        server_id=i + 1, peers=peers, **kw))
        for i, port in enumerate(client_ports)
    ]


def hosts_of(servers: list[ZooKeeperServer]) -> str:
    return ",".join(s.hosts for s in servers)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "streammanager/zookeeper"
