"""SM_ZK_AUTH / AGENT_ZK_AUTH: the cluster's znodes readable and writable by its own identity only.

Without it, anyone who reaches ZooKeeper reads the registry and writes node groups (boot scripts that
run as root on new nodes), node records (where lookups send publishers and viewers) and commands."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
import requests
from kazoo.exceptions import NoAuthError

from streammanager.cloud import build_providers
from streammanager.cloud.base import DEFAULT_BOOT_SCRIPT, render_boot_script
from streammanager.config import ConfigError, ControllerSettings, ServerSettings
from streammanager.registry import ZkPaths, ensure_layout, make_client
from streammanager.zookeeper import free_port
from tests.conftest import BIN, next_loopback, wait_until
from tests.test_agent_process import NGINX_PUBLISH, post_form
from tests.test_cloud_providers import launch_request

P = "/streammanager/api/2.0"
IDENTITY = "cluster:Zk-0123456789abcdef+/="


def test_with_zk_auth_the_cluster_works_and_nobody_else_reads_or_writes_its_registry(
        procs, spawn_agent, zookeeper, zk_root, zk, tmp_path):
    port = free_port()
    procs([str(BIN / "streammanager"), "serve", "--bind", f"127.0.0.1:{port}", "--log-format", "text"],
          {"SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root, "SM_ZK_AUTH": IDENTITY,
           "SM_ACCESS_TOKEN": "tok"}, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    _, host, hook_port, node_id = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_AUTH": IDENTITY})
    wait_until(lambda: _get(f"{url}/healthz").get("nodes") == 1, 30, what="the agent in the API's view (the feed)")
    assert post_form(host, hook_port, {**NGINX_PUBLISH, "name": "guarded"}).status_code == 200
    wait_until(lambda: requests.get(f"{url}{P}/event/live/guarded/stats", timeout=5).status_code == 200, 10,
               what="the stream live")
    assert requests.get(f"{url}{P}/event/live/guarded?action=broadcast", timeout=5).json()["serverAddress"] == host

    # anyone else: the anonymous test client, and one with other credentials
    other = make_client(zookeeper.hosts, auth="intruder:Zk-0123456789abcdef")
    other.start(timeout=10)
    try:
        for client in (zk, other):
            for read in (lambda: client.get(f"{zk_root}/v1/nodes/{node_id}"),
                         lambda: client.get_children(f"{zk_root}/v1/nodes"),
                         lambda: client.get(f"{zk_root}/v1/streams/live/guarded")):
                with pytest.raises(NoAuthError):
                    read()
            with pytest.raises(NoAuthError):  # e.g. a node group whose boot script runs as root on new nodes
                client.create(f"{zk_root}/v1/groups/evil", json.dumps({"name": "evil"}).encode())
            with pytest.raises(NoAuthError):
                client.delete(f"{zk_root}/v1/nodes/{node_id}")
    finally:
        other.stop()
        other.close()
    assert _get(f"{url}/healthz").get("nodes") == 1  # nothing changed


def test_a_controllers_local_agents_get_the_clusters_identity(zookeeper, zk_root, tmp_path):
    settings = ControllerSettings(zk_hosts=zookeeper.hosts, zk_root=zk_root, zk_auth=IDENTITY,
                                  local_state_dir=str(tmp_path / "local"), local_pool="127.0.1.233-127.0.1.235",
                                  local_http_port=free_port(), local_agent_args="--log-format text")
    provider = build_providers(settings)["local"]
    ours = make_client(zookeeper.hosts, auth=IDENTITY)
    ours.start(timeout=10)
    instance = provider.launch(dataclasses.replace(launch_request("edge-auth", "c1", "us-east-1", "", ""),
                                                   media="none"))
    try:
        record = f"{zk_root}/v1/nodes/edge-auth"
        wait_until(lambda: ours.exists(record) is not None, 30, what="the local agent registered")
        acl, _ = ours.get_acls(record)
        assert [(a.id.scheme, a.id.id.split(":")[0]) for a in acl] == [("digest", "cluster")]
    finally:
        provider.destroy(instance.id, "c1")
        ours.stop()
        ours.close()


def test_a_local_instances_stored_boot_script_with_the_zookeeper_password_is_readable_by_its_owner_only(
        zookeeper, zk_root, tmp_path):
    # the controller renders the password into every boot script (${zk_auth}); the local provider keeps
    # the script beside the instance, where it was readable by every local user (mode 0644)
    settings = ControllerSettings(zk_hosts=zookeeper.hosts, zk_root=zk_root, zk_auth=IDENTITY,
                                  local_state_dir=str(tmp_path / "local"), local_pool="127.0.1.236-127.0.1.238",
                                  local_http_port=free_port(), local_agent_args="--log-format text")
    provider = build_providers(settings)["local"]
    script = render_boot_script(DEFAULT_BOOT_SCRIPT, package="streammanager", zk_hosts=zookeeper.hosts,
                                zk_root=zk_root, zk_auth=IDENTITY, role="edge", region="us-east-1", group="g1",
                                capacity=10, media="none", node_id="edge-script", cluster_id="c1")
    request = launch_request("edge-script", "c1", "us-east-1", "", "")
    instance = provider.launch(dataclasses.replace(request, media="none", boot_script=script))
    try:
        stored = tmp_path / "local" / "edge-script" / "boot-script.sh"
        assert IDENTITY in stored.read_text()  # kept for inspection, as it was
        assert stored.stat().st_mode & 0o077 == 0, oct(stored.stat().st_mode)
    finally:
        provider.destroy(instance.id, "c1")


@pytest.mark.parametrize("value", ["nopassword", "user:short", "user:has space in it!", ":no-user-0123456789"])
def test_bad_zookeeper_credentials_are_refused_at_start_without_echoing_them(value):
    with pytest.raises(ConfigError) as refused:
        ServerSettings.from_env({"SM_ZK_AUTH": value})
    assert "SM_ZK_AUTH" in str(refused.value) and value not in str(refused.value)


def test_the_zookeeper_password_is_not_in_the_settings_repr():
    assert "0123456789" not in repr(ServerSettings(zk_auth=IDENTITY))
    assert "0123456789" not in repr(ControllerSettings(zk_auth=IDENTITY))


def _get(url: str) -> dict:
    try:
        return requests.get(url, timeout=2).json()
    except (requests.RequestException, ValueError):
        return {}


def test_an_agent_with_other_credentials_says_why_it_cannot_register(zookeeper, zk_root, tmp_path):
    ours = make_client(zookeeper.hosts, auth=IDENTITY)
    ours.start(timeout=10)
    try:
        ensure_layout(ours, ZkPaths(zk_root))  # the cluster's registry, its own identity's only
    finally:
        ours.stop()
        ours.close()
    env = {**os.environ, "AGENT_ZK_HOSTS": zookeeper.hosts, "AGENT_ZK_ROOT": zk_root,
           "AGENT_ZK_AUTH": "intruder:Zk-0123456789abcdef"}
    result = subprocess.run([str(BIN / "node-agent"), "--role", "edge", "--region", "us-east-1", "--media", "none",
                             "--host", next_loopback(), "--http-port", str(free_port()), "--log-format", "text",
                             "--work-dir", str(tmp_path / "agent")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    # kazoo's NoAuthError has no message: the line ended in "...:2181: " and said nothing
    assert "cannot register in ZooKeeper" in result.stderr and "NoAuthError" in result.stderr, result.stderr
    assert "Zk-0123456789abcdef" not in result.stderr + result.stdout  # and never the password
