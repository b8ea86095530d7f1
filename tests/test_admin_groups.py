"""The node group admin routes against a real ZooKeeper, with simulated nodes (in-process agents)."""
import copy

import pytest

from streammanager.groups import INSERVICE, STARTING, TERMINATING, InstanceRecord, NodeGroup
from streammanager.registry import ZkPaths
from tests.conftest import wait_for_nodes, wait_until
from tests.test_groups import EXAMPLE

P = "/streammanager/api/2.0"
TOKEN = "s3cret-token"



def doc(**changes):
    body = copy.deepcopy(EXAMPLE)
    body.update(changes)
    return body


def call(api, method, path, token=TOKEN, **kw):
    query = f"?accessToken={token}" if token is not None else ""
    return getattr(api, method)(f"{P}{path}{query}", **kw)


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"errorMessage", "timestamp"}
    assert isinstance(body["timestamp"], int) and body["timestamp"] > 1_600_000_000_000
    for fragment in fragments:
        assert fragment in body["errorMessage"]


def create(api, body=None):
    response = call(api, "post", "/admin/nodegroup", json=body or EXAMPLE)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def put_instance(zk, zk_root, record: InstanceRecord):
    paths = ZkPaths(zk_root)
    zk.ensure_path(paths.instances)
    zk.create(paths.instance(record.id), record.to_json())


def read_instance(zk, zk_root, instance_id) -> InstanceRecord:
    data, _ = zk.get(ZkPaths(zk_root).instance(instance_id))
    return InstanceRecord.from_json(data)


def record(instance_id, state, **kw):
    return InstanceRecord(id=instance_id, group="g1", region="us-east-1", role="edge", provider="local",
                          state=state, provider_id=f"p-{instance_id}", created_ms=1, state_since_ms=1, **kw)


# -- groups --------------------------------------------------------------------------------------------
def test_creating_a_group_answers_201_with_the_stored_document_and_its_defaults(api):
    stored = create(api)
    assert stored == NodeGroup.from_api(copy.deepcopy(EXAMPLE)).to_api()
    assert stored["scalePolicy"]["bootTimeoutS"] == 300
    assert stored["scalePolicy"]["failureBudget"] == 3
    assert stored["regions"]["us-east-1"]["edge"] == {"min": 1, "max": 5, "increment": 1}
    assert call(api, "get", "/admin/nodegroup/g1").get_json() == stored


def test_creating_a_group_that_exists_is_a_400_that_points_to_put(api):
    create(api)
    assert_error(call(api, "post", "/admin/nodegroup", json=doc(regions={"eu-west-1": {"edge": {"min": 0, "max": 1}}})),
                 400, "exists", "PUT")
    assert call(api, "get", "/admin/nodegroup/g1").get_json()["regions"] == EXAMPLE["regions"]


def test_groups_are_listed_by_name(api):
    assert call(api, "get", "/admin/nodegroup").get_json() == []
    create(api, doc(name="gb"))
    create(api, doc(name="ga"))
    listed = call(api, "get", "/admin/nodegroup").get_json()
    assert [g["name"] for g in listed] == ["ga", "gb"]


def test_an_unknown_group_is_a_404_and_a_bad_name_a_400(api):
    assert_error(call(api, "get", "/admin/nodegroup/nope"), 404, "nope")
    assert_error(call(api, "get", "/admin/nodegroup/Bad_Name"), 400, "group name")


def test_updating_a_group_replaces_it(api):
    create(api)
    changed = doc(regions={"us-east-1": {"edge": {"min": 2, "max": 8, "increment": 2}}})
    response = call(api, "put", "/admin/nodegroup/g1", json=changed)
    assert response.status_code == 200
    assert response.get_json()["regions"] == changed["regions"]
    assert call(api, "get", "/admin/nodegroup/g1").get_json()["regions"] == changed["regions"]


def test_an_update_body_without_a_name_takes_the_urls(api):
    create(api)
    body = doc(scalePolicy={"coolDownS": 30})
    del body["name"]
    response = call(api, "put", "/admin/nodegroup/g1", json=body)
    assert response.status_code == 200 and response.get_json()["name"] == "g1"
    assert response.get_json()["scalePolicy"]["coolDownS"] == 30


def test_updating_an_unknown_group_is_a_404_and_creates_nothing(api):
    assert_error(call(api, "put", "/admin/nodegroup/g1", json=EXAMPLE), 404, "g1")
    assert call(api, "get", "/admin/nodegroup").get_json() == []


def test_an_update_whose_body_names_another_group_is_a_400(api):
    create(api)
    create(api, doc(name="g2"))
    assert_error(call(api, "put", "/admin/nodegroup/g1", json=doc(name="g2")), 400, "g2", "g1")
    assert call(api, "get", "/admin/nodegroup/g1").get_json()["name"] == "g1"


def test_a_deleted_group_is_gone(api):
    create(api)
    response = call(api, "delete", "/admin/nodegroup/g1")
    assert response.status_code == 200 and response.get_json()["deleted"] is True
    assert_error(call(api, "get", "/admin/nodegroup/g1"), 404)
    assert_error(call(api, "delete", "/admin/nodegroup/g1"), 404)
    assert call(api, "get", "/admin/nodegroup").get_json() == []


ROUTES = [("post", "/admin/nodegroup"), ("get", "/admin/nodegroup"), ("get", "/admin/nodegroup/g1"),
          ("put", "/admin/nodegroup/g1"), ("delete", "/admin/nodegroup/g1"), ("get", "/admin/nodegroup/g1/node"),
          ("post", "/admin/node/n1/sunset"), ("post", "/admin/node/sunset"), ("delete", "/admin/node/n1")]


def test_every_route_refuses_a_missing_or_wrong_access_token_and_changes_nothing(api):
    create(api)
    bodies = {"post": EXAMPLE, "put": doc(regions={"us-east-1": {"edge": {"min": 0, "max": 1}}})}
    for method, path in ROUTES:
        body = ["127.0.1.1"] if path.endswith("/node/sunset") else bodies.get(method)
        assert_error(call(api, method, path, token=None, json=body), 401, "missing accessToken")
        assert_error(call(api, method, path, token="wrong", json=body), 401, "invalid accessToken")
    assert call(api, "get", "/admin/nodegroup/g1").get_json()["regions"] == EXAMPLE["regions"]


def test_the_access_token_is_also_accepted_as_a_bearer_header(api):
    create(api)
    response = api.get(f"{P}/admin/nodegroup", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and len(response.get_json()) == 1


def deep(**changes):
    """The example with nested changes: ``launchConfig__provider="ec2"``."""
    body = copy.deepcopy(EXAMPLE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = body
        for part in parents:
            target = target[part]
        target[last] = value
    return body


@pytest.mark.parametrize("body, fragment", [
    (doc(regions={"us-east-1": {"edge": {"min": 6, "max": 5}}}), "regions.us-east-1.edge.min"),
    (deep(launchConfig__provider="azure"), "launchConfig.provider"),
    (doc(regions={"atlantis-1": {"edge": {"min": 0, "max": 1}}}), "atlantis-1"),
    (doc(launchConfig={"provider": "gce", "image": "debian-12", "size": "e2-small"}), "GCE region"),
    (doc(name="G1"), "group name"),
    (doc(name="g1-"), "group name"),
    (doc(name=7), "group name"),
    (doc(scalePolicy={"scaleOutAt": 0.5, "scaleInBelow": 0.5}), "scaleInBelow"),
    (doc(scalePolicy={"evaluationIntervalS": 0}), "scalePolicy.evaluationIntervalS"),
    (doc(colour="blue"), "colour"),
    (deep(launchConfig__bootScript="run ${password}"), "password"),
    (deep(launchConfig__capacity={"origin": 10 ** 30, "edge": 1}), "launchConfig.capacity.origin"),
    ([EXAMPLE], "JSON object"),
    (doc(scalePolicy={"scaleOutAt": 10 ** 400}), "scalePolicy.scaleOutAt"),
    # GCE names instances <group>-<region>-<role>-<id>, at most 63 characters
    (doc(name="a" * 26, launchConfig={"provider": "gce", "image": "debian-12", "size": "e2-small"},
         regions={"northamerica-northeast1": {"origin": {"min": 0, "max": 1}}}), "at most 25 for the group name"),
], ids=["min-over-max", "unknown-provider", "unknown-region", "aws-region-for-gce", "uppercase-name",
        "trailing-dash", "non-string-name", "scale-in-at-scale-out", "zero-interval", "unknown-field",
        "unknown-boot-variable", "huge-capacity", "not-an-object", "huge-number", "gce-name-too-long"])
def test_an_invalid_group_is_a_400_naming_the_field_and_nothing_is_stored(api, body, fragment):
    assert_error(call(api, "post", "/admin/nodegroup", json=body), 400, fragment)
    assert call(api, "get", "/admin/nodegroup").get_json() == []


def test_an_invalid_update_is_a_400_and_keeps_the_stored_group(api):
    stored = create(api)
    bad = doc(regions={"us-east-1": {"edge": {"min": 3, "max": 2}}})
    assert_error(call(api, "put", "/admin/nodegroup/g1", json=bad), 400, "min")
    assert call(api, "get", "/admin/nodegroup/g1").get_json() == stored


def test_a_body_that_is_not_json_is_a_400(api):
    assert_error(call(api, "post", "/admin/nodegroup", data="name=g1", content_type="application/json"), 400, "JSON")
    assert_error(call(api, "post", "/admin/nodegroup", data="{}", content_type="text/plain"), 400, "JSON")
    assert_error(call(api, "post", "/admin/nodegroup"), 400, "JSON")


def test_a_nan_in_the_policy_is_a_400_not_a_stored_nan(api):
    # Python's JSON parser (Flask's) accepts the NaN literal
    raw = ('{"name": "g1", "launchConfig": {"provider": "local"}, '
           '"regions": {"us-east-1": {"edge": {"min": 0, "max": 1}}}, "scalePolicy": {"coolDownS": NaN}}')
    assert_error(call(api, "post", "/admin/nodegroup", data=raw, content_type="application/json"), 400,
                 "scalePolicy.coolDownS")


# -- a group's nodes -----------------------------------------------------------------------------------
def test_a_groups_nodes_are_listed_with_their_lifecycle_state(api, make_node, zk, zk_root):
    create(api)
    managed = make_node("edge", "us-east-1", group="g1", node_id="g1-us-east-1-edge-aaaaaa")
    manual = make_node("origin", "us-east-1", group="g1")
    make_node("edge", "us-east-1", group="other")
    put_instance(zk, zk_root, record(managed.id, INSERVICE))
    put_instance(zk, zk_root, record("g1-us-east-1-edge-bbbbbb", STARTING))
    put_instance(zk, zk_root, InstanceRecord(id="g2-x", group="g2", region="us-east-1", role="edge",
                                             provider="local", state=STARTING))
    wait_for_nodes(api, 3)
    listed = call(api, "get", "/admin/nodegroup/g1/node").get_json()
    by_id = {n["id"]: n for n in listed}
    assert sorted(by_id) == sorted([managed.id, manual.id, "g1-us-east-1-edge-bbbbbb"])
    registered = by_id[managed.id]
    assert (registered["role"], registered["region"], registered["state"], registered["managed"]) == (
        "edge", "us-east-1", "inservice", True)
    assert registered["serverAddress"] == managed.host
    assert registered["agentUrl"] == managed.agent.settings.agent_url
    booting = by_id["g1-us-east-1-edge-bbbbbb"]
    assert (booting["state"], booting["serverAddress"], booting["agentUrl"]) == ("starting", None, None)
    assert (booting["role"], booting["region"]) == ("edge", "us-east-1")
    by_hand = by_id[manual.id]
    assert (by_hand["role"], by_hand["state"], by_hand["managed"], by_hand["serverAddress"]) == (
        "origin", "inservice", False, manual.host)
    assert by_hand["agentUrl"].startswith("http://")


def test_a_deleted_groups_instances_are_listed_while_they_drain(api, make_node, zk, zk_root):
    create(api)
    node = make_node("edge", "us-east-1", group="g1", node_id="g1-us-east-1-edge-cccccc")
    put_instance(zk, zk_root, record(node.id, INSERVICE))
    wait_for_nodes(api, 1)
    assert call(api, "delete", "/admin/nodegroup/g1").status_code == 200
    put_instance(zk, zk_root, record("g1-us-east-1-edge-dddddd", STARTING))  # the controller's records stay
    listed = call(api, "get", "/admin/nodegroup/g1/node")
    assert listed.status_code == 200, listed.get_json()
    assert sorted(n["id"] for n in listed.get_json()) == [node.id, "g1-us-east-1-edge-dddddd"]


def test_the_nodes_of_an_unknown_group_are_a_404(api):
    assert_error(call(api, "get", "/admin/nodegroup/nope/node"), 404, "nope")


def test_deleting_a_managed_node_moves_its_instance_to_terminating(api, zk, zk_root):
    put_instance(zk, zk_root, record("g1-i1", INSERVICE))
    response = call(api, "delete", "/admin/node/g1-i1")
    assert response.status_code == 200
    assert response.get_json() == {"id": "g1-i1", "group": "g1", "region": "us-east-1", "role": "edge",
                                   "state": "terminating"}
    stored = read_instance(zk, zk_root, "g1-i1")
    assert stored.state == TERMINATING and stored.reason == "removed by an operator"
    again = call(api, "delete", "/admin/node/g1-i1")
    assert again.status_code == 200 and again.get_json()["state"] == "terminating"


def test_deleting_a_node_the_controller_did_not_launch_is_a_400_and_an_unknown_one_a_404(api, make_node):
    manual = make_node("edge", "us-east-1", group="g1")
    wait_for_nodes(api, 1)
    assert_error(call(api, "delete", f"/admin/node/{manual.id}"), 400, "not launched by the controller")
    assert_error(call(api, "delete", "/admin/node/ghost"), 404, "ghost")


# -- sunset --------------------------------------------------------------------------------------------
def node_state(api, node_id):
    return call(api, "get", f"/admin/node/{node_id}").get_json()["state"]


@pytest.fixture
def live_show(api, make_node):
    """An origin publishing 'show' and two edges of group g1; returns (drained-to-be edge, other edge)."""
    origin = make_node("origin", "us-east-1", group="g1")
    first = make_node("edge", "us-east-1", group="g1")
    second = make_node("edge", "us-east-1", group="g1")
    wait_for_nodes(api, 3)
    assert origin.publish("show").status_code == 200
    wait_until(lambda: api.get(f"{P}/event/live/show/stats").status_code == 200, what="stream live")
    return first, second


def subscribe_answers(api, count=20):
    answers = set()
    for _ in range(count):
        response = api.get(f"{P}/event/live/show?action=subscribe&region=us-east-1")
        assert response.status_code == 200, response.get_data(as_text=True)
        answers.add(response.get_json()["serverAddress"])
    return answers


def test_a_sunset_node_drains_and_is_never_answered_to_a_subscriber(api, live_show):
    drained, other = live_show
    response = call(api, "post", f"/admin/node/{drained.id}/sunset")
    assert response.status_code == 200
    assert response.get_json()["state"] == "draining" and response.get_json()["serverAddress"] == drained.host
    wait_until(lambda: node_state(api, drained.id) == "draining", timeout_s=5, what="the node to drain")
    assert subscribe_answers(api) == {other.host}
    assert node_state(api, other.id) == "inservice"


def test_red5s_sunset_by_address_drains_every_node_at_the_addresses(api, live_show):
    drained, other = live_show
    response = call(api, "post", "/admin/node/sunset", json=[drained.host])
    assert response.status_code == 200
    assert [(n["id"], n["state"]) for n in response.get_json()] == [(drained.id, "draining")]
    wait_until(lambda: node_state(api, drained.id) == "draining", timeout_s=5, what="the node to drain")
    assert subscribe_answers(api) == {other.host}


def test_a_sunset_of_an_unknown_node_or_address_is_a_404(api, make_node):
    node = make_node("edge", "us-east-1", group="g1")
    wait_for_nodes(api, 1)
    assert_error(call(api, "post", "/admin/node/ghost/sunset"), 404, "ghost")
    assert_error(call(api, "post", "/admin/node/sunset", json=[node.host, "10.9.9.9"]), 404, "10.9.9.9")
    assert node_state(api, node.id) == "inservice"  # nothing drained when one address is unknown


@pytest.mark.parametrize("body", [[], {"addresses": ["127.0.1.1"]}, [7], [""], "127.0.1.1"])
def test_a_sunset_by_address_needs_a_json_list_of_addresses(api, body):
    assert_error(call(api, "post", "/admin/node/sunset", json=body), 400, "JSON list")


@pytest.mark.parametrize("field", ["image", "size", "bootScript"])
def test_a_lone_surrogate_in_a_launch_config_string_is_a_400_not_a_500(api, field):
    import json
    body = json.dumps(doc(launchConfig={**EXAMPLE["launchConfig"], field: "SURROGATE"})).replace("SURROGATE", "\\ud800")
    response = call(api, "post", "/admin/nodegroup", data=body, content_type="application/json")
    assert_error(response, 400, f"launchConfig.{field}")


def test_a_deeply_nested_body_is_a_400_not_a_500(api):
    body = '{"a":' * 5000 + "1" + "}" * 5000
    response = call(api, "post", "/admin/nodegroup", data=body, content_type="application/json")
    assert_error(response, 400, "nested")
