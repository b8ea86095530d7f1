"""Bad values and unreachable dependencies on the command line: a clear message naming the option or
variable, a non-zero exit, never a Python traceback (README, "Configuration")."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from streammanager.zookeeper import free_port
from tests.conftest import BIN, wait_until


def run(argv, env=None, timeout=60):
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize("argv, env, named", [
    (["node-agent", "--role", "origin", "--region", "us-east-1", "--media", "none", "--http-port", "70000"],
     {}, "--http-port"),
    (["node-agent", "--role", "origin", "--region", "us-east-1", "--media", "none"],
     {"AGENT_RTMP_PORT": "65536"}, "AGENT_RTMP_PORT"),
    (["streammanager", "controller"], {"SM_LOCAL_HTTP_PORT": "70000"}, "SM_LOCAL_HTTP_PORT"),
    (["streammanager", "zookeeper", "--port", "99999"], {}, "--port"),
    (["streammanager", "demo", "--api-port", "0"], {}, "--api-port"),
])
def test_a_port_out_of_range_is_refused_naming_its_option(argv, env, named, tmp_path):
    # nothing listens there: a process that took the bad port would wait for ZooKeeper, then fail otherwise
    env = {"AGENT_ZK_HOSTS": f"127.0.0.1:{free_port()}", "SM_ZK_HOSTS": f"127.0.0.1:{free_port()}",
           "SM_LOCAL_STATE_DIR": str(tmp_path / "lc"), **env}
    result = run(argv, env)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "65535" in result.stderr, result.stderr


def test_zookeepers_heap_and_tick_must_be_positive():
    for option in ("--heap-mb", "--tick-ms"):
        result = run(["streammanager", "zookeeper", "--port", str(free_port()), option, "-5"])
        assert result.returncode == 2 and option in result.stderr and "positive" in result.stderr, result.stderr


# `streammanager controller` with a shorter connection timeout than its 30 s, so that the test waits 2 s
CONTROLLER_2S = ("import sys; import streammanager.controller as c; c.CONNECT_TIMEOUT_S = 2.0; "
                 "from streammanager.cli import main; sys.exit(main(['controller']))")


def test_a_controller_that_cannot_reach_zookeeper_says_so_and_exits(tmp_path):
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([sys.executable, "-c", CONTROLLER_2S], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SM_ZK_HOSTS": hosts, "SM_LOCAL_STATE_DIR": str(tmp_path / "lc")},
                            stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert "SM_ZK_HOSTS" in result.stderr and hosts in result.stderr and "within 2 s" in result.stderr, result.stderr


def test_a_controller_waiting_for_zookeeper_stops_cleanly_on_sigterm(procs, tmp_path):
    proc = procs([str(BIN / "streammanager"), "controller"],
                 {"SM_ZK_HOSTS": f"127.0.0.1:{free_port()}", "SM_LOCAL_STATE_DIR": str(tmp_path / "lc")},
                 log_path=tmp_path / "controller.log")
    wait_until(lambda: "kazoo" in proc.log() or proc.popen.poll() is not None, 30,
               what="the controller to try ZooKeeper")
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(90) == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def test_a_controller_whose_metrics_address_is_taken_says_which_setting(zookeeper, tmp_path):
    result = run(["streammanager", "controller"],
                 {"SM_ZK_HOSTS": zookeeper.hosts, "SM_LOCAL_STATE_DIR": str(tmp_path / "lc"),
                  "SM_CONTROLLER_METRICS_BIND": zookeeper.hosts})  # ZooKeeper's own port: in use
    assert result.returncode == 2, result.stderr
    assert "SM_CONTROLLER_METRICS_BIND" in result.stderr and "in use" in result.stderr, result.stderr


def test_a_data_or_work_directory_that_cannot_be_made_is_a_message_not_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file
    result = run(["streammanager", "zookeeper", "--port", str(free_port()), "--data-dir", str(blocker / "zk")])
    assert result.returncode == 1 and f"data directory {blocker / 'zk'}" in result.stderr, result.stderr
    result = run(["streammanager", "demo", "--media", "none", "--api-port", str(free_port()), "--zk-port",
                  str(free_port()), "--work-dir", str(blocker / "demo")])
    assert result.returncode == 1 and f"work directory {blocker / 'demo'}" in result.stderr, result.stderr


def test_an_agent_whose_hook_port_is_taken_names_the_option(zookeeper, zk_root, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["node-agent", "--role", "origin", "--region", "us-east-1", "--media", "none", "--host",
                      "127.0.0.1", "--http-port", str(port), "--work-dir", str(tmp_path / "agent")],
                     {"AGENT_ZK_HOSTS": zookeeper.hosts, "AGENT_ZK_ROOT": zk_root})
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "AGENT_HTTP_PORT" in result.stderr, result.stderr


@pytest.mark.parametrize("argv", [["streammanager", "serve", "--help"], ["streammanager", "controller", "--help"],
                                  ["node-agent", "--help"]])
def test_help_shows_defaults_as_the_readme_writes_them(argv):
    # it printed Python's True and None ("default True", "default None") where the README says on and unset
    out = " ".join(run(argv).stdout.split())  # argparse wraps lines
    assert "default True" not in out and "default False" not in out and "default None" not in out, out
    if argv[1] == "serve":
        assert "SM_REGISTRY_FEED, default on" in out
