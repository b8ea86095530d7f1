"""``streammanager zookeeper`` runs a real ZooKeeper on loopback and leaves nothing behind."""
import os
import signal
import subprocess
import time

from streammanager.zookeeper import four_letter, free_port
from tests.conftest import BIN, wait_until


def java_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "java"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "X"
    return stat != "Z"


def serves(port: int) -> bool:
    try:
        return four_letter(port, "ruok") == "imok"
    except OSError:
        return False


def start(procs, tmp_path, port):
    return procs([str(BIN / "streammanager"), "zookeeper", "--port", str(port), "--data-dir",
                  str(tmp_path / "zk")], log_path=tmp_path / "zk.log")


def test_zookeeper_serves_on_loopback_with_admin_server_off_and_stops_on_sigterm(procs, tmp_path):
    port = free_port()
    proc = start(procs, tmp_path, port)
    wait_until(lambda: serves(port), 20, what="ZooKeeper to answer ruok")
    config = (tmp_path / "zk" / "zoo.cfg").read_text()
    assert "clientPortAddress=127.0.0.1" in config and "admin.enableServer=false" in config
    [java] = java_children(proc.pid)
    cmdline = open(f"/proc/{java}/cmdline").read().split("\0")
    assert any(arg.startswith("-Xmx") for arg in cmdline)
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    java_sockets = [line for line in listening.splitlines() if f"pid={java}," in line]
    assert java_sockets and all(" 127.0.0.1:" in line for line in java_sockets), java_sockets
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(15) == 0
    wait_until(lambda: not alive(java), 5, what="java to exit")
    assert not serves(port)


def test_a_killed_supervisor_takes_its_zookeeper_with_it(procs, tmp_path):
    port = free_port()
    proc = start(procs, tmp_path, port)
    wait_until(lambda: serves(port), 20, what="ZooKeeper to answer ruok")
    [java] = java_children(proc.pid)
    proc.signal(signal.SIGKILL)
    proc.popen.wait(5)
    wait_until(lambda: not alive(java), 5, what="the orphaned java to die")


def test_zookeeper_refuses_a_port_in_use_with_a_clear_exit(procs, tmp_path, zookeeper):
    proc = procs([str(BIN / "streammanager"), "zookeeper", "--port", str(zookeeper.config.port),
                  "--data-dir", str(tmp_path / "zk2")], log_path=tmp_path / "zk2.log")
    assert proc.popen.wait(30) == 1
    time.sleep(0.2)
    assert "zookeeper" in proc.log().lower()
