"""The controller with the local provider: real ZooKeeper, real node-agent processes on 127.0.1.x.

Viewers are simulated through the agents' nginx hooks (``--media none``), so load moves the way a real
edge reports it; lookups go through the real API.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest
import requests

from streammanager.cloud import build_providers
from streammanager.cloud.base import CloudProvider
from streammanager.config import ControllerSettings
from streammanager.controller import Controller
from streammanager.scaling_store import read_instances
from streammanager.registry import ZkPaths
from streammanager.zookeeper import free_port
from tests.conftest import BIN, wait_until

TOKEN = "s3cret-token"
GROUP = "/streammanager/api/2.0/admin/nodegroup"


def group_doc(name="g1", region="us-east-1", edge=(1, 3, 1), origin=None, capacity_edge=4, **policy):
    roles = {"edge": dict(zip(("min", "max", "increment"), edge))}
    if origin:
        roles["origin"] = dict(zip(("min", "max", "increment"), origin))
    return {"name": name,
            "launchConfig": {"provider": "local", "media": "none",
                             "capacity": {"origin": 10, "edge": capacity_edge}},
            "regions": {region: roles},
            "scalePolicy": {"scaleOutAt": 0.6, "scaleInBelow": 0.2, "evaluationIntervalS": 0.5,
                            "warmUpS": 0.5, "coolDownS": 1, "drainTimeoutS": 30, "bootTimeoutS": 20, **policy}}


@pytest.fixture
def controller_settings(zookeeper, zk_root, tmp_path):
    return ControllerSettings(
        zk_hosts=zookeeper.hosts, zk_root=zk_root, cluster_id="test-cluster", controller_id="c1",
        tick_s=0.2, sweep_interval_s=5, local_state_dir=str(tmp_path / "cloud"),
        local_pool="127.0.1.160-127.0.1.200", local_http_port=free_port(),
        local_agent_args="--log-format text --report-interval-s 0.3", log_format="text")


class Running:
    def __init__(self, controller: Controller):
        self.controller = controller
        self.stop = threading.Event()
        self.thread = threading.Thread(target=controller.run, args=(self.stop,), daemon=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)


@pytest.fixture
def start_controller(controller_settings):
    running: list[Running] = []

    def start(**overrides) -> Controller:
        settings = ControllerSettings(**{**controller_settings.__dict__, **overrides})
        controller = Controller(settings, build_providers(settings))
        run = Running(controller)
        run.thread.start()
        running.append(run)
        return controller

    yield start
    for run in running:
        run.close()
    # every instance the tests launched is destroyed by PID, whatever the test did
    for provider in build_providers(controller_settings).values():
        for instance in provider.list_instances(controller_settings.cluster_id):
            provider.destroy(instance.id, controller_settings.cluster_id)


def admin(api, method, path, **kw):
    return getattr(api, method)(f"{path}?accessToken={TOKEN}", **kw)


def group_instances(zk, zk_root, group="g1", states=None):
    found = read_instances(zk, ZkPaths(zk_root))
    return sorted((r for r, _ in found.values() if r.group == group and (states is None or r.state in states)),
                  key=lambda r: r.created_ms)


def in_service_nodes(api, group="g1"):
    nodes = admin(api, "get", f"{GROUP}/{group}/node").get_json()
    return [n for n in nodes if n["state"] == "inservice"]


def play(node: dict, stream: str, clientid: str):
    response = requests.post(f"{node['agentUrl']}/hooks/nginx", timeout=5, data={
        "call": "play", "app": "live", "name": stream, "clientid": clientid, "addr": "127.0.0.1"})
    assert response.status_code == 200, response.text


def stop_playing(node: dict, stream: str, clientid: str):
    requests.post(f"{node['agentUrl']}/hooks/nginx", timeout=5, data={
        "call": "play_done", "app": "live", "name": stream, "clientid": clientid, "addr": "127.0.0.1"})


def publish(node: dict, stream: str):
    response = requests.post(f"{node['agentUrl']}/hooks/nginx", timeout=5, data={
        "call": "publish", "app": "live", "name": stream, "clientid": "pub", "addr": "127.0.0.1", "type": "live"})
    assert response.status_code == 200, response.text


def test_a_new_group_is_brought_to_its_minimum_with_registered_nodes(api, zk, zk_root, start_controller):
    assert admin(api, "post", GROUP, json=group_doc(edge=(2, 3, 1), origin=(1, 1, 1))).status_code == 201
    start_controller()
    nodes = wait_until(lambda: len(in_service_nodes(api)) == 3 and in_service_nodes(api), 30,
                       what="3 nodes in service")
    assert sorted(n["role"] for n in nodes) == ["edge", "edge", "origin"]
    assert {n["region"] for n in nodes} == {"us-east-1"}
    assert len({n["serverAddress"] for n in nodes}) == 3  # each on its own loopback address
    assert all(n["managed"] for n in nodes)
    # a broadcaster and a viewer are sent to the launched nodes
    origin = next(n for n in nodes if n["role"] == "origin")
    answer = api.get("/streammanager/api/2.0/event/live/s1?action=broadcast").get_json()
    assert answer["serverAddress"] == origin["serverAddress"]


def test_a_group_scales_out_under_load_and_back_in_when_viewers_leave(api, zk, zk_root, start_controller):
    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 3, 1), origin=(1, 1, 1))).status_code == 201
    start_controller()

    def edges():
        return [n for n in in_service_nodes(api) if n["role"] == "edge"]

    def edge_instances(*states):
        return [r for r in group_instances(zk, zk_root, states=states) if r.role == "edge"]

    origin = wait_until(lambda: [n for n in in_service_nodes(api) if n["role"] == "origin"], 30, what="origin")[0]
    publish(origin, "s1")
    first = wait_until(edges, 30, what="the first edge")[0]
    for i in range(3):  # 3 of 4 seats: 0.75 >= 0.6
        play(first, "s1", f"v{i}")
    wait_until(lambda: len(edges()) == 2, 30, what="a second edge after scale-out")
    threading.Event().wait(2)  # load 3/8 is under 0.6: no third edge, and over 0.2: no scale-in
    assert len(edge_instances("requested", "starting", "inservice")) == 2
    for i in range(3):
        stop_playing(first, "s1", f"v{i}")
    # idle: one edge drained and terminated, back to min 1
    wait_until(lambda: len(edge_instances("requested", "starting", "inservice", "draining", "terminating")) == 1,
               30, what="scale-in back to one edge")
    gone = edge_instances("gone")
    assert len(gone) == 1 and gone[0].reason.startswith("drained"), gone
    assert len(edges()) == 1


def test_a_dead_node_is_replaced(api, zk, zk_root, start_controller, controller_settings):
    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 2, 1))).status_code == 201
    start_controller(absence_grace_s=2)
    first = wait_until(lambda: in_service_nodes(api), 30, what="the first edge")[0]
    provider = build_providers(controller_settings)["local"]
    instance = next(i for i in provider.list_instances("test-cluster") if i.name == first["id"])
    os.killpg(instance.extra["pid"], signal.SIGKILL)  # the machine dies
    # its session expires (4 s), then the controller waits SM_ABSENCE_GRACE_S for it to register again
    replaced = wait_until(lambda: [n for n in in_service_nodes(api) if n["id"] != first["id"]], 60,
                          what="a replacement edge")
    assert len(replaced) == 1
    failed = [r for r in group_instances(zk, zk_root) if r.id == first["id"]][0]
    assert failed.failure == "node died"
    # max holds: exactly one active instance after the replacement
    active = group_instances(zk, zk_root, states=("requested", "starting", "inservice"))
    assert [r.id for r in active] == [replaced[0]["id"]]


def test_a_draining_edge_keeps_its_viewers_gets_no_new_ones_and_ends_when_empty(
        api, zk, zk_root, start_controller):
    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 3, 1), origin=(1, 1, 1))).status_code == 201
    start_controller()
    origin = wait_until(lambda: [n for n in in_service_nodes(api) if n["role"] == "origin"], 30, what="origin")[0]
    publish(origin, "s1")
    edge = wait_until(lambda: [n for n in in_service_nodes(api) if n["role"] == "edge"], 30, what="edge")[0]
    for i in range(3):
        play(edge, "s1", f"v{i}")
    second = wait_until(lambda: [n for n in in_service_nodes(api) if n["role"] == "edge"
                                 and n["id"] != edge["id"]], 30, what="scale-out")[0]
    response = admin(api, "post", f"/streammanager/api/2.0/admin/node/{edge['id']}/sunset")
    assert response.status_code == 200, response.get_json()
    wait_until(lambda: [r for r in group_instances(zk, zk_root) if r.id == edge["id"]][0].state == "draining",
               10, what="the sunset edge to drain")
    for _ in range(3):  # no new viewer is sent to the draining edge (the second has 4 seats)
        answer = api.get("/streammanager/api/2.0/event/live/s1?action=subscribe").get_json()
        assert answer["serverAddress"] == second["serverAddress"]
    # its viewers stay: the instance is not terminated while they watch
    threading.Event().wait(2)
    record = [r for r in group_instances(zk, zk_root) if r.id == edge["id"]][0]
    assert record.state == "draining"
    for i in range(3):
        stop_playing(edge, "s1", f"v{i}")
    wait_until(lambda: [r for r in group_instances(zk, zk_root) if r.id == edge["id"]][0].state == "gone",
               15, what="the drained edge to be terminated")


def test_launch_failures_spend_the_budget_and_pause_scaling(api, zk, zk_root, start_controller, tmp_path):
    doc = group_doc(edge=(2, 3, 1), failureBudget=2, failureWindowS=600)
    assert admin(api, "post", GROUP, json=doc).status_code == 201
    start_controller(local_pool="127.0.1.201-127.0.1.201")  # room for one instance only
    wait_until(lambda: len(group_instances(zk, zk_root, states=("failed", "gone"))) >= 2, 20,
               what="two failed launches")
    threading.Event().wait(2)
    records = group_instances(zk, zk_root)
    assert len([r for r in records if r.failure]) == 2  # paused: no third attempt
    assert len([r for r in records if r.state in ("starting", "inservice")]) == 1


def test_killing_the_leading_controller_hands_over_without_a_double_launch(
        api, zk, zk_root, procs, controller_settings, tmp_path):
    assert admin(api, "post", GROUP, json=group_doc(edge=(2, 2, 1))).status_code == 201
    env = {"SM_ZK_HOSTS": controller_settings.zk_hosts, "SM_ZK_ROOT": zk_root, "SM_CLUSTER_ID": "test-cluster",
           "SM_LOCAL_STATE_DIR": controller_settings.local_state_dir, "SM_LOCAL_POOL": controller_settings.local_pool,
           "SM_LOCAL_HTTP_PORT": str(controller_settings.local_http_port),
           "SM_LOCAL_AGENT_ARGS": controller_settings.local_agent_args, "SM_CONTROLLER_TICK_S": "0.2",
           "SM_LOG_FORMAT": "text"}
    first = second = None
    try:
        first = procs([str(BIN / "streammanager"), "controller", "--controller-id", "first"], env,
                      tmp_path / "first.log")
        wait_until(lambda: len(in_service_nodes(api)) == 2, 30, what="two edges from the first controller")
        second = procs([str(BIN / "streammanager"), "controller", "--controller-id", "second"], env,
                       tmp_path / "second.log")
        threading.Event().wait(1.5)  # the second is campaigning, not leading
        assert "leads" not in second.log()
        first.signal(signal.SIGKILL)
        # within the session timeout (4 s) plus a tick and the election's own round trips
        wait_until(lambda: "second leads" in second.log(), 8, what="the second controller to lead")
        # the new leader keeps the same two instances and launches nothing more
        threading.Event().wait(3)
        records = group_instances(zk, zk_root)
        assert len(records) == 2, [(r.id, r.state) for r in records]
        assert all(r.state == "inservice" for r in records)
        # and it acts: raising the minimum launches exactly one more
        doc = group_doc(edge=(3, 3, 1))
        assert admin(api, "put", f"{GROUP}/g1", json=doc).status_code == 200
        wait_until(lambda: len(in_service_nodes(api)) == 3, 30, what="a third edge from the new leader")
        assert len(group_instances(zk, zk_root)) == 3
    finally:  # the controllers first: a running one would replace the instances destroyed below
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        for provider in build_providers(controller_settings).values():
            for instance in provider.list_instances("test-cluster"):
                provider.destroy(instance.id, "test-cluster")


def test_a_pool_held_for_the_same_reason_is_logged_once_a_minute_not_at_every_step(caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    from streammanager import autoscaler, controller

    clock = [1000.0]
    monkeypatch.setattr(controller.time, "monotonic", lambda: clock[0])
    pool = autoscaler.PoolStatus("m1", "us-east-1", "edge", 1, 1, 0, 10, 10)
    fake = SimpleNamespace(_holds={}, _pools_reported=set(), instances=SimpleNamespace(records=lambda: {}))

    def step(*reasons):
        holds = [autoscaler.Hold("m1", "us-east-1", "edge", r) for r in reasons]
        controller.Controller._report(fake, autoscaler.Plan(holds=holds, pools=[pool]))
        clock[0] += 1.0

    with caplog.at_level(logging.INFO, logger="streammanager.controller"):
        for i in range(30):  # due steps hold, the steps between hold nothing; the load wobbles
            step(f"load {0.9 + i / 1000:.3f} >= 0.6 but at max 1") if i % 2 == 0 else step()
        step("in warm-up for 3 s")  # another kind of hold: at once
        clock[0] += 60
        step("in warm-up for 2 s")  # the same kind, a minute later: again
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("holding")]
    assert len(lines) == 3, lines
    assert "at max" in lines[0] and "warm-up" in lines[1] and "warm-up" in lines[2]


def test_a_provider_raising_an_unexpected_error_fails_that_action_only(zk, zk_root):
    """A driver that raises something else than ProviderError (libcloud's EC2 error parser raises ValueError
    on an error with a <Type> element, as moto sends for AuthFailure) must not abort every decision step:
    the destroy is retried later and the other groups' launches go on."""
    from streammanager.groups import FAILED, InstanceRecord, NodeGroup
    from streammanager.registry import ZkPaths, ensure_layout, now_ms
    from streammanager.scaling_store import GroupStore

    class Broken(CloudProvider):
        name = "ec2"

        def launch(self, request):
            raise AttributeError("'NoneType' object has no attribute 'text'")

        def list_instances(self, cluster_id):
            raise ValueError("too many values to unpack (expected 2)")

        def destroy(self, instance_id, cluster_id):
            raise ValueError("too many values to unpack (expected 2)")

    paths = ZkPaths(zk_root)
    ensure_layout(zk, paths)
    settings = ControllerSettings(zk_hosts="unused", zk_root=zk_root, cluster_id="test-cluster", controller_id="c1")
    fine = RecordingProvider()
    controller = Controller(settings, {"ec2": Broken(), "local": fine}, client=zk)
    ec2_doc = group_doc("e1", edge=(1, 2, 1))
    ec2_doc["launchConfig"].update(provider="ec2", image="ami-12345678", size="t3.small")
    store = GroupStore(zk, paths)
    store.create(NodeGroup.from_api(ec2_doc))
    store.create(NodeGroup.from_api(group_doc("z1", edge=(1, 2, 1))))
    now = now_ms()
    failed = InstanceRecord(id="e1-us-east-1-edge-abcdef", group="e1", region="us-east-1", role="edge", provider="ec2",
                            state=FAILED, provider_id="us-east-1/i-0123", created_ms=now, state_since_ms=now,
                            failure="boot timeout", reason="did not register")
    zk.create(paths.instance(failed.id), failed.to_json())
    controller.view.start()
    controller.view.wait_initialized(10)
    controller.instances.start()
    try:
        controller.run_once(now_ms())  # sweep (list raises), destroy raises, e1's launch raises
        controller.run_once(now_ms())
    finally:
        controller.instances.close()
        controller.view.close()
    assert len(fine.launched) == 1 and fine.launched[0].startswith("z1-")
    records = read_instances(zk, paths)
    assert records[failed.id][0].reason.startswith("destroy failed: unexpected ValueError")
    e1 = [r for r, _ in records.values() if r.group == "e1" and r.id != failed.id]
    assert e1 and all(r.failure == "launch failed" for r in e1)


def test_a_leader_that_loses_zookeeper_while_launching_launches_no_more_of_its_plan():
    """A launch can take as long as the cloud's timeout (30 s); a leader whose session was lost meanwhile has
    been replaced, and the new leader launches what the pool still lacks: the old one must stop there."""
    from types import SimpleNamespace

    from streammanager import autoscaler
    from streammanager.groups import NodeGroup

    created = []
    controller = _bare_controller(SimpleNamespace(create=created.append, write=lambda record: None,
                                                  get=lambda instance_id: None))

    slow = RecordingProvider(during_launch=controller._lost.set)  # ZooKeeper went away during the call
    controller.providers = {"local": slow}
    group = NodeGroup.from_api(group_doc("g1", edge=(3, 5, 1)))
    decided = autoscaler.Plan(launches=[autoscaler.Launch("g1", "us-east-1", "edge", "below min 3")] * 3)
    controller._actions.wait(controller._carry_out(1_800_000_000_000, decided, {"g1": group}), 10)
    assert len(slow.launched) == 1  # the calls not begun when ZooKeeper went are not made


@pytest.mark.parametrize("unconfirmed", [True, False])
def test_a_launch_whose_answer_was_lost_stays_requested_for_the_sweep_and_spends_no_budget(unconfirmed):
    """A read timeout or a dropped connection after RunInstances was sent (or a GCE operation still running at
    the deadline) may have made the instance: the record stays requested, so that the sweep adopts it, instead
    of failing it (which spends the failure budget, and makes the sweep destroy the instance as a stray)."""
    from types import SimpleNamespace

    from streammanager import autoscaler
    from streammanager.cloud.base import CloudProvider, ProviderError
    from streammanager.groups import NodeGroup

    written = []
    controller = _bare_controller(SimpleNamespace(create=written.append, write=written.append,
                                                  get=lambda instance_id: None))

    class LostAnswer(CloudProvider):
        def launch(self, request):
            raise ProviderError("ec2 launch in us-east-1 failed: ('Connection aborted.', RemoteDisconnected(...))",
                                unconfirmed=unconfirmed)

        def list_instances(self, cluster_id):
            return []

        def destroy(self, instance_id, cluster_id):
            return True

    controller.providers = {"local": LostAnswer()}
    group = NodeGroup.from_api(group_doc("g1", edge=(1, 5, 1)))
    calls = controller._carry_out(1_800_000_000_000,
                                  autoscaler.Plan(launches=[autoscaler.Launch("g1", "us-east-1", "edge", "x")]),
                                  {"g1": group})
    controller._actions.wait(calls, 10)
    final = written[-1]
    if unconfirmed:
        assert final.state == "requested" and not final.failure and final.state_since_ms == 1_800_000_000_000
    else:
        assert final.state == "failed" and final.failure == "launch failed"


def test_which_cloud_errors_leave_a_launch_unconfirmed():
    import requests
    from libcloud.common.types import LibcloudError
    from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

    from streammanager.cloud.base import is_unconfirmed

    refused = requests.ConnectionError(MaxRetryError(None, "/", NewConnectionError(None, "refused")))
    dropped = requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    assert not is_unconfirmed(refused) and not is_unconfirmed(requests.ConnectTimeout("connect"))
    assert is_unconfirmed(dropped) and is_unconfirmed(requests.ReadTimeout("read timed out"))
    assert is_unconfirmed(LibcloudError("Job did not complete in 30.0 seconds"))
    assert not is_unconfirmed(LibcloudError("InvalidAMIID.NotFound: The image id '[ami-1]' does not exist"))
    from streammanager.cloud.base import is_unreachable
    assert is_unreachable(refused) and is_unreachable(requests.ConnectTimeout("connect"))
    assert not is_unreachable(dropped) and not is_unreachable(requests.ReadTimeout("read timed out"))
    assert not is_unreachable(LibcloudError("InvalidAMIID.NotFound: The image id '[ami-1]' does not exist"))


def _bare_controller(instances):
    """A controller without ZooKeeper, for what ``_carry_out`` does with the cloud."""
    from streammanager.controller import CloudActions, CloudBackoff

    controller = Controller.__new__(Controller)
    controller._lost = threading.Event()
    controller._actions = CloudActions(controller._lost)
    controller._unreachable = CloudBackoff()
    controller._drain_asked = {}
    controller.settings = ControllerSettings(cluster_id="test-cluster")
    controller.instances = instances
    return controller


def test_a_hung_cloud_holds_back_only_its_own_calls(zk, zk_root, monkeypatch):
    """Every cloud call may take its 30 s timeout: made one after another on the decision loop, one hung
    endpoint (an EC2 region that accepts connections and never answers) held every group of every
    provider for minutes. Each provider's calls now run on their own thread."""
    from streammanager import controller as controller_module
    from streammanager.groups import STARTING, NodeGroup
    from streammanager.registry import ZkPaths, ensure_layout, now_ms
    from streammanager.scaling_store import GroupStore

    monkeypatch.setattr(controller_module, "ACTION_WAIT_S", 0.5)
    release = threading.Event()

    paths = ZkPaths(zk_root)
    ensure_layout(zk, paths)
    settings = ControllerSettings(zk_hosts="unused", zk_root=zk_root, cluster_id="test-cluster", controller_id="c1")
    hung = RecordingProvider(during_launch=lambda: release.wait(60), during_list=lambda: release.wait(60))
    fine = RecordingProvider()
    controller = Controller(settings, {"ec2": hung, "local": fine}, client=zk)
    ec2_doc = group_doc("e1", edge=(1, 2, 1))
    ec2_doc["launchConfig"].update(provider="ec2", image="ami-12345678", size="t3.small")
    store = GroupStore(zk, paths)
    store.create(NodeGroup.from_api(ec2_doc))
    store.create(NodeGroup.from_api(group_doc("z1", edge=(1, 2, 1))))
    controller.view.start()
    controller.view.wait_initialized(10)
    controller.instances.start()
    try:
        for _ in range(2):
            step = threading.Thread(target=controller.run_once, args=(now_ms(),), daemon=True)
            step.start()
            step.join(15)
            assert not step.is_alive()  # the step went on without the hung provider
        wait_until(lambda: len(fine.launched) == 1, 5, what="the local group's launch")
        assert hung.launched == []  # queued behind the hung listing of the same provider
        release.set()
        wait_until(lambda: any(r.group == "e1" and r.state == STARTING for r, _ in read_instances(zk, paths).values()),
                   10, what="the hung provider's launch, made and recorded once the cloud answered")
        assert len(hung.launched) == 1 and len(fine.launched) == 1  # nothing launched twice
    finally:
        release.set()
        controller._actions.close()
        controller.instances.close()
        controller.view.close()


def test_a_cloud_that_cannot_be_reached_spends_no_failure_budget_and_is_tried_again_later(zk, zk_root, monkeypatch):
    """libcloud's EC2 driver against an address where nothing listens (a cloud API down): each launch fails
    at once, and those failures spent the failure budget within a second, pausing the region's scaling for
    the whole failure window below its minimum. They are held off and tried again instead."""
    import socket

    from streammanager import controller as controller_module
    from streammanager.cloud.ec2 import Ec2Provider
    from streammanager.groups import NodeGroup
    from streammanager.registry import ZkPaths, ensure_layout, now_ms
    from streammanager.scaling_store import GroupStore

    monkeypatch.setattr(controller_module.CloudBackoff, "FIRST_S", 1.0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    paths = ZkPaths(zk_root)
    ensure_layout(zk, paths)
    settings = ControllerSettings(zk_hosts="unused", zk_root=zk_root, cluster_id="test-cluster", controller_id="c1")
    provider = Ec2Provider("AKIAEXAMPLE", "not-a-secret", "us-east-1", endpoint=("127.0.0.1", port, False), timeout_s=5)
    controller = Controller(settings, {"ec2": provider}, client=zk)
    doc = group_doc("e1", edge=(2, 4, 1), failureBudget=2, failureWindowS=600, evaluationIntervalS=0.1)
    doc["launchConfig"].update(provider="ec2", image="ami-785db401", size="t3.small")
    GroupStore(zk, paths).create(NodeGroup.from_api(doc))
    controller.view.start()
    controller.view.wait_initialized(10)
    controller.instances.start()
    tried = lambda: len([r for r, _ in read_instances(zk, paths).values() if r.group == "e1"])  # noqa: E731
    try:
        first = controller.run_once(now_ms())
        assert len(first.launches) == 2
        wait_until(lambda: all(r.state in ("failed", "gone") for r, _ in read_instances(zk, paths).values()), 10,
                   what="both launches failed")
        assert tried() == 2
        held = controller.run_once(now_ms())  # within the back-off: planned, not launched
        assert len(held.launches) == 2 and tried() == 2
        assert not any("paused" in h.reason for h in held.holds)  # the budget (2) is not spent
        wait_until(lambda: not controller._unreachable.holds("ec2", "us-east-1"), 5, what="the back-off to end")
        again = controller.run_once(now_ms())
        assert len(again.launches) >= 1 and not any("paused" in h.reason for h in again.holds)
        wait_until(lambda: tried() > 2, 10, what="the launches tried again")
    finally:
        controller._actions.close()
        controller.instances.close()
        controller.view.close()
        provider.close()


class RecordingProvider(CloudProvider):
    """A cloud whose launches succeed at once (recorded in ``launched``), with a hook in its calls."""

    def __init__(self, during_launch=lambda: None, during_list=lambda: None):
        self.launched: list[str] = []
        self._during_launch, self._during_list = during_launch, during_list

    def launch(self, request):
        from streammanager.cloud.base import Instance

        self.launched.append(request.name)
        self._during_launch()
        return Instance(id=f"p-{request.name}", name=request.name, state="running", cluster_id=request.cluster_id,
                        group=request.group, region=request.region, role=request.role)

    def list_instances(self, cluster_id):
        self._during_list()
        return []

    def destroy(self, instance_id, cluster_id):
        return True


def test_a_leader_stops_at_once_on_sigterm_while_a_cloud_call_hangs_and_launches_nothing_after(
        api, zk, zk_root, procs, controller_settings, tmp_path):
    """A hung cloud endpoint (here: the local cloud's state lock held) must not keep a stopped controller
    alive: the interpreter joined the cloud thread at exit, so SIGTERM waited for the call (a driver's whole
    timeout, or for good), and the call was then made by a controller that no longer led."""
    import fcntl
    import time

    env = {"SM_ZK_HOSTS": controller_settings.zk_hosts, "SM_ZK_ROOT": zk_root, "SM_CLUSTER_ID": "test-cluster",
           "SM_LOCAL_STATE_DIR": controller_settings.local_state_dir, "SM_LOCAL_POOL": controller_settings.local_pool,
           "SM_LOCAL_HTTP_PORT": str(controller_settings.local_http_port),
           "SM_LOCAL_AGENT_ARGS": controller_settings.local_agent_args, "SM_CONTROLLER_TICK_S": "0.2",
           "SM_LOG_FORMAT": "text"}
    os.makedirs(controller_settings.local_state_dir, exist_ok=True)
    lock = open(os.path.join(controller_settings.local_state_dir, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # every launch now blocks inside the driver
    leader = None
    try:
        leader = procs([str(BIN / "streammanager"), "controller", "--controller-id", "hung"], env,
                       tmp_path / "hung.log")
        assert admin(api, "post", GROUP, json=group_doc(edge=(1, 1, 1))).status_code == 201
        wait_until(lambda: "still under way" in leader.log(), 20, what="a launch hung in the cloud call")
        leader.signal(signal.SIGTERM)
        try:
            leader.popen.wait(15)
        except Exception:
            pass
        assert leader.popen.poll() is not None, "the controller did not exit on SIGTERM while a cloud call hung"
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        if leader is not None:
            leader.stop()
    time.sleep(1)
    launched = [i for p in build_providers(controller_settings).values() for i in p.list_instances("test-cluster")]
    assert launched == [], "a controller that had stopped made the hung launch"


def _stepping_controller(settings, zk):
    """A controller whose steps the test makes (``run_once``), with the real local provider and registry."""
    from streammanager.registry import ensure_layout

    ensure_layout(zk, ZkPaths(settings.zk_root))
    controller = Controller(settings, build_providers(settings), client=zk)
    controller.view.start()
    controller.view.wait_initialized(10)
    controller.instances.start()
    return controller


def _close_stepping(controller, settings):
    controller.instances.close()
    controller.view.close()
    for provider in build_providers(settings).values():
        for instance in provider.list_instances(settings.cluster_id):
            provider.destroy(instance.id, settings.cluster_id)


def _evaluated_step(controller, group="g1"):
    """Steps until one evaluates ``group``'s policy; returns every plan made on the way, that one last."""
    from streammanager.registry import now_ms

    plans = []
    while not plans or group not in plans[-1].evaluated:
        plans.append(controller.run_once(now_ms()))
    return plans


def test_the_cool_down_after_a_drain_lasts_once_the_drained_node_is_gone(api, zk, zk_root, controller_settings):
    """An empty node is drained, terminated and gone in a second or two; the next drain waited for coolDownS
    only while the first was still draining or terminating, so a pool shrank by a node a step."""
    assert admin(api, "post", GROUP, json=group_doc(edge=(3, 3, 1), coolDownS=8)).status_code == 201
    controller = _stepping_controller(controller_settings, zk)
    try:
        plans = []

        def step():
            plans.extend(_evaluated_step(controller))
            return True

        wait_until(lambda: step() and len(in_service_nodes(api)) == 3, 30, interval_s=0.1, what="3 edges")
        assert admin(api, "put", f"{GROUP}/g1", json=group_doc(edge=(1, 3, 1), coolDownS=8)).status_code == 200
        # once the launches' cool-down is over, one idle edge drains
        first = wait_until(lambda: step() and group_instances(zk, zk_root, states=("draining",)), 30,
                           interval_s=0.1, what="a scale-in")[0]
        # it is empty: terminated and gone within a few steps
        wait_until(lambda: step() and [r for r in group_instances(zk, zk_root) if r.id == first.id][0].state
                   == "gone", 20, interval_s=0.1, what="the drained edge to be gone")
        step()
        drains = [m.record.id for p in plans for m in p.moves if m.record.state == "draining"]
        assert drains == [first.id]  # the second waits for the cool-down
        assert any("cooling down" in h.reason for h in plans[-1].holds), plans[-1].holds
        assert len(group_instances(zk, zk_root, states=("inservice",))) == 2
    finally:
        _close_stepping(controller, controller_settings)


def test_nodes_that_fail_at_a_boot_timeout_as_long_as_the_failure_window_spend_the_budget(
        api, zk, zk_root, controller_settings):
    """The failure window was counted from each launch, not from its failure: with bootTimeoutS at least
    failureWindowS, a node that never registers failed outside the window, and the pool launched forever."""
    from dataclasses import replace

    doc = group_doc(edge=(2, 3, 1), bootTimeoutS=3, failureWindowS=3, failureBudget=2)
    assert admin(api, "post", GROUP, json=doc).status_code == 201
    # its agents register elsewhere: the controller never sees them, as with a broken image
    settings = replace(controller_settings, local_agent_args=f"{controller_settings.local_agent_args} "
                                                             f"--zk-root {zk_root}-elsewhere")
    controller = _stepping_controller(settings, zk)
    try:
        plans = []

        def failed_at_boot():
            plans.extend(_evaluated_step(controller))
            return [m for p in plans for m in p.moves if m.record.failure == "boot timeout"]

        wait_until(lambda: len(failed_at_boot()) >= 2, 30, interval_s=0.1, what="two boot timeouts")
        failures = [i for i, p in enumerate(plans) for m in p.moves if m.record.failure == "boot timeout"]
        after = plans[failures[1]:]
        # the second failure spends the budget of two: the pool is paused below its min, nothing launched
        assert [launch for p in after for launch in p.launches] == []
        assert any("scaling is paused" in h.reason for p in after for h in p.holds)
    finally:
        _close_stepping(controller, settings)


def test_a_draining_instance_whose_agent_was_never_told_is_asked_again(api, zk, zk_root, controller_settings):
    """The record says draining, the node does not (the leader died between writing the record and queueing
    the drain command, or queueing it failed): lookups went on choosing the node until its drain deadline
    killed it with its viewers. The new leader asks its agent again."""
    from streammanager.groups import DRAINING, InstanceRecord
    from streammanager.registry import now_ms

    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 2, 1), drainTimeoutS=60)).status_code == 201
    controller = _stepping_controller(controller_settings, zk)
    try:
        def step():
            _evaluated_step(controller)
            return True

        edge = wait_until(lambda: step() and in_service_nodes(api), 30, interval_s=0.1, what="an edge")[0]
        # what a leader that died right after its scale-in decision leaves behind
        path = ZkPaths(zk_root).instance(edge["id"])
        data, stat = zk.get(path)
        now = now_ms()
        record = InstanceRecord.from_json(data).moved(DRAINING, now, "scale in: load 0.00 < 0.2",
                                                      drain_deadline_ms=now + 60_000)
        zk.set(path, record.to_json(), version=stat.version)
        wait_until(lambda: controller.instances.get(edge["id"]).state == DRAINING, 10, what="the cache")
        # told again, the agent drains; its node is empty, so the instance ends as drained, long before its deadline
        drained = wait_until(lambda: step() and [r for r in group_instances(zk, zk_root) if r.id == edge["id"]
                                                 and r.reason == "drained: empty"], 15, interval_s=0.1,
                             what="the edge's agent to drain")[0]
        assert drained.state in ("terminating", "gone")
    finally:
        _close_stepping(controller, controller_settings)


def test_a_local_agent_whose_controller_died_before_recording_its_pid_is_listed_and_destroyed(controller_settings):
    """A controller killed between starting a local agent and writing its facts left an agent that no
    controller could list, adopt or destroy: it stayed registered for good (seen when a leader was SIGKILLed
    during a scale-out). The facts are now written before the agent starts; what such a controller leaves
    (facts without a pid, a running agent) is found by the agent's command line."""
    import json
    from pathlib import Path

    from streammanager.cloud.base import LaunchRequest

    provider = build_providers(controller_settings)["local"]
    instance = provider.launch(LaunchRequest(
        cluster_id="test-cluster", group="g1", region="us-east-1", role="edge", name="g1-us-east-1-edge-0dead0",
        image="", size="", boot_script="", capacity=4, media="none", placement={}))
    pid = instance.extra["pid"]
    facts_path = Path(controller_settings.local_state_dir) / f"{instance.name}.json"
    facts = json.loads(facts_path.read_text())
    facts_path.write_text(json.dumps({**facts, "pid": 0}))  # the pid was never written
    try:
        other = build_providers(controller_settings)["local"]  # the next leader
        listed = [i for i in other.list_instances("test-cluster") if i.name == instance.name]
        assert listed and listed[0].state == "running" and listed[0].extra["pid"] == pid
        assert other.destroy(instance.id, "test-cluster")
        assert not Path(f"/proc/{pid}").exists() or b"0dead0" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _first_in_service(controller, zk, zk_root, step, what: str):
    """Steps until the group's one instance is in service and in the controller's view; returns it."""
    def one_in_service():
        step()
        serving = group_instances(zk, zk_root, states=("inservice",))
        return serving if len(serving) == 1 and serving[0].id in {n.id for n in controller.view.nodes()} else None
    return wait_until(one_in_service, 30, what=f"{what} in service")[0]


def _hang_past_its_session(provider, controller, instance_id: str, step) -> None:
    """Freeze the instance's agent until its session expired (its node left the view) and a few more
    steps were made, then let it go on, stepping until it registered again on a new session."""
    [pid] = [i.extra["pid"] for i in provider.list_instances("test-cluster") if i.name == instance_id]
    os.killpg(pid, signal.SIGSTOP)  # as a ZooKeeper outage past the session timeout does to every agent
    try:
        wait_until(lambda: step() and instance_id not in {n.id for n in controller.view.nodes()}, 20,
                   what="its session expired")
        for _ in range(5):
            step()
    finally:
        os.killpg(pid, signal.SIGCONT)
    wait_until(lambda: step() and instance_id in {n.id for n in controller.view.nodes()}, 20,
               what="its agent registered again")


def test_a_node_that_registers_again_on_a_new_session_is_not_taken_for_dead(api, zk, zk_root, controller_settings):
    """A ZooKeeper outage longer than the session timeout expires every agent's session at once, and each
    registers again on a new one moments after: the controller took every node for dead in between,
    destroyed it with its live streams and launched a replacement. A hung machine does the same to one."""
    from streammanager.registry import now_ms

    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 2, 1))).status_code == 201
    controller = _stepping_controller(controller_settings, zk)
    plans = []

    def step():
        plans.append(controller.run_once(now_ms()))
        return plans[-1]
    try:
        instance = _first_in_service(controller, zk, zk_root, step, "an edge")
        provider = build_providers(controller_settings)["local"]
        path = ZkPaths(zk_root).node(instance.id)
        plans.clear()
        _hang_past_its_session(provider, controller, instance.id, step)
        assert not [d for p in plans for d in p.destroys] and not [lc for p in plans for lc in p.launches]
        (record,) = [r for r in group_instances(zk, zk_root) if r.id == instance.id]
        assert record.state == "inservice"
        assert zk.exists(path) is not None
        assert [i.name for i in provider.list_instances("test-cluster")] == [instance.id]
    finally:
        _close_stepping(controller, controller_settings)


def test_a_draining_node_that_registers_again_on_a_new_session_is_not_terminated(api, zk, zk_root,
                                                                                 controller_settings):
    """A draining node still serves what it drains (it ends when empty, or at its deadline). A ZooKeeper
    outage past the session timeout expires its session like every agent's, and it registers again moments
    after: the controller terminated it in the step that found it missing ("drained: its node left"), and
    its viewers and publishers with it."""
    from streammanager.registry import now_ms

    doc = group_doc(edge=(0, 1, 1), origin=(1, 2, 1), drainTimeoutS=300)
    assert admin(api, "post", GROUP, json=doc).status_code == 201
    controller = _stepping_controller(controller_settings, zk)
    plans = []

    def step():
        plans.append(controller.run_once(now_ms()))
        return plans[-1]

    def record_of(instance_id):
        return [r for r in group_instances(zk, zk_root) if r.id == instance_id][0]
    try:
        instance = _first_in_service(controller, zk, zk_root, step, "an origin")
        origin = [n for n in in_service_nodes(api) if n["id"] == instance.id][0]
        publish(origin, "drained-slowly")  # not empty: it drains until its deadline
        assert admin(api, "post", f"/streammanager/api/2.0/admin/node/{instance.id}/sunset").status_code == 200
        wait_until(lambda: step() and record_of(instance.id).state == "draining"
                   and any(n.id == instance.id and n.state == "draining" and n.used for n in controller.view.nodes()),
                   20, what="the origin draining with its publisher")
        provider = build_providers(controller_settings)["local"]
        plans.clear()
        _hang_past_its_session(provider, controller, instance.id, step)
        assert not [d for p in plans for d in p.destroys]
        assert record_of(instance.id).state == "draining"
        assert instance.id in [i.name for i in provider.list_instances("test-cluster")]  # beside its replacement
    finally:
        _close_stepping(controller, controller_settings)


def test_a_node_whose_record_another_version_wrote_is_not_taken_for_dead(api, zk, zk_root, controller_settings):
    """During a rolling upgrade a newer agent writes a record this controller cannot decode. Its node is
    registered all the same (its session's znode is there): the controller took it for a node that died,
    destroyed it with its live streams and launched a replacement, one step after the write."""
    import orjson

    from streammanager.registry import now_ms

    assert admin(api, "post", GROUP, json=group_doc(edge=(1, 2, 1))).status_code == 201
    controller = _stepping_controller(controller_settings, zk)
    try:
        instance = _first_in_service(controller, zk, zk_root, lambda: controller.run_once(now_ms()), "an edge")
        path = ZkPaths(zk_root).node(instance.id)
        doc = orjson.loads(zk.get(path)[0])
        newer = orjson.dumps({**doc, "schema": doc["schema"] + 1, "a_newer_field": {"x": 1}})
        for _ in range(3):  # the agent itself may rewrite its record meanwhile (a load change): again
            zk.set(path, newer)
            wait_until(lambda: instance.id in controller.view.unreadable(), 10, what="the record skipped")
            plan = controller.run_once(now_ms())
            if instance.id in controller.view.unreadable() or zk.exists(path) is None:
                break
        assert not plan.destroys and not plan.launches
        assert instance.id in controller.view.unreadable()
        (record,) = [r for r in group_instances(zk, zk_root) if r.id == instance.id]
        assert record.state == "inservice"
        assert zk.exists(path) is not None  # the agent still runs: its session's znode is there
        assert [i.name for i in build_providers(controller_settings)["local"].list_instances("test-cluster")] \
            == [instance.id]
    finally:
        _close_stepping(controller, controller_settings)


@contextlib.contextmanager
def _controller_on_its_own_zookeeper(tmp_path, controller_settings, **controller_kw):
    """A running controller on a ZooKeeper of the test's own, which ``freeze()`` hangs (SIGSTOP) and
    ``thaw()`` lets go on; everything is stopped at the end."""
    from streammanager.zookeeper import ZooKeeperConfig, ZooKeeperServer

    server = ZooKeeperServer(ZooKeeperConfig(data_dir=tmp_path / "own-zk", port=free_port(), tick_ms=500,
                                             heap_mb=128))
    server.start()
    settings = ControllerSettings(**{**controller_settings.__dict__, "zk_hosts": server.hosts, "zk_timeout_s": 4.0})
    run = Running(Controller(settings, build_providers(settings), **controller_kw))
    run.thread.start()
    frozen = []

    def freeze():
        os.kill(server.pid, signal.SIGSTOP)
        frozen.append(True)

    def thaw():
        os.kill(server.pid, signal.SIGCONT)
        frozen.clear()
    try:
        yield run, freeze, thaw
    finally:
        if frozen:
            thaw()
        run.close()
        server.stop()


def test_a_leader_cut_off_from_zookeeper_stops_saying_it_leads_at_once(tmp_path, controller_settings):
    """sm_controller_leader stayed 1 through a whole ZooKeeper outage (24 s measured), with its pools'
    numbers: the leading thread waited in a ZooKeeper call, and the gauges were cleared only after it.
    Meanwhile another controller may lead, and the metrics showed two leaders counting every pool."""
    from prometheus_client import REGISTRY

    with _controller_on_its_own_zookeeper(tmp_path, controller_settings) as (run, freeze, thaw):
        wait_until(lambda: run.controller.leading.is_set(), 15, what="the controller leads")
        wait_until(lambda: REGISTRY.get_sample_value("sm_controller_leader") == 1, 5, what="the gauge says so")
        freeze()  # ZooKeeper hangs: the controller cannot know who leads
        wait_until(lambda: REGISTRY.get_sample_value("sm_controller_leader") == 0, 15,
                   what="the gauge to stop saying this controller leads")
        thaw()
        wait_until(lambda: run.controller.leading.is_set() and REGISTRY.get_sample_value("sm_controller_leader") == 1,
                   20, what="the controller leading again, and saying so")


def test_a_leader_cut_off_from_zookeeper_stops_its_duties_at_once(tmp_path, controller_settings):
    """A leader cut off from ZooKeeper went on running its leader-only duties (the event callbacks) until
    the outage was over: they were stopped at the clean-up after the leading thread's ZooKeeper call, which
    returns only when ZooKeeper is back. By then another controller led, and both delivered the queued
    events: after a 10 s outage, 8 of 12 stream-closed events were posted twice (measured)."""
    from streammanager.controller import leader_duties

    class Probe:
        name = "probe"

        def __init__(self):
            self.started, self.stopped = threading.Event(), threading.Event()

        def run(self, stop: threading.Event) -> None:
            self.started.set()
            stop.wait()
            self.stopped.set()

    probes: list[Probe] = []

    def duties(client, paths, settings):
        probes.append(Probe())
        return [*leader_duties(client, paths, settings), probes[-1]]

    with _controller_on_its_own_zookeeper(tmp_path, controller_settings, duties=duties) as (run, freeze, thaw):
        wait_until(lambda: run.controller.leading.is_set() and probes and probes[0].started.is_set(), 15,
                   what="the controller leads, its duties running")
        freeze()  # ZooKeeper hangs: another controller may lead meanwhile
        wait_until(lambda: probes[0].stopped.is_set(), 15, what="the duties of the cut-off leader to be stopped")
        thaw()
        wait_until(lambda: run.controller.leading.is_set() and len(probes) > 1 and probes[-1].started.is_set(),
                   20, what="the controller leading again, with its duties")
