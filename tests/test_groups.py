"""Node group documents are validated in one place: NodeGroup.from_api accepts a good document with its
defaults filled and refuses a bad one with a GroupError that names the field at fault."""
import copy
import math

import orjson
import pytest

from streammanager.groups import (
    FAILED,
    GroupError,
    InstanceRecord,
    LaunchConfig,
    NodeGroup,
    PoolLimits,
    ScalePolicy,
    validate_group_name,
)
from streammanager.models import RecordError

# the example document of ARCHITECTURE.md, section "Contracts"
EXAMPLE = {
    "name": "g1",
    "launchConfig": {"provider": "local", "image": "", "size": "", "media": "none",
                     "capacity": {"origin": 50, "edge": 200}},
    "regions": {"us-east-1": {"origin": {"min": 1, "max": 2, "increment": 1},
                              "edge": {"min": 1, "max": 5, "increment": 1}}},
    "scalePolicy": {"scaleOutAt": 0.6, "scaleInBelow": 0.2, "evaluationIntervalS": 2,
                    "warmUpS": 5, "coolDownS": 10, "drainTimeoutS": 60},
}


def example(**changes):
    """The example document with changes: ``{"a.b.c": value}`` sets a nested field, ``None`` removes it."""
    doc = copy.deepcopy(EXAMPLE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = doc
        for part in parents:
            target = target[part]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return doc


def refusal(doc, name=None) -> str:
    with pytest.raises(GroupError) as caught:
        NodeGroup.from_api(doc, name)
    return str(caught.value)


# -- a good document ----------------------------------------------------------------------------------
def test_the_architecture_example_is_accepted_with_the_unset_policy_fields_defaulted():
    group = NodeGroup.from_api(copy.deepcopy(EXAMPLE))
    assert group.name == "g1"
    assert group.launch == LaunchConfig("local", "", "", "none", {"origin": 50, "edge": 200}, None)
    assert group.regions == {"us-east-1": {"origin": PoolLimits(1, 2, 1), "edge": PoolLimits(1, 5, 1)}}
    assert group.policy == ScalePolicy(scale_out_at=0.6, scale_in_below=0.2, evaluation_interval_s=2.0,
                                       warm_up_s=5.0, cool_down_s=10.0, drain_timeout_s=60.0)
    api = group.to_api()
    assert api["scalePolicy"]["bootTimeoutS"] == 300.0
    assert api["scalePolicy"]["failureBudget"] == 3
    assert api["scalePolicy"]["failureWindowS"] == 600.0
    assert "bootScript" not in api["launchConfig"]


def test_a_minimal_document_gets_the_issue_defaults_out_at_0_6_and_in_below_0_2():
    group = NodeGroup.from_api({"name": "tiny", "launchConfig": {"provider": "local"},
                                "regions": {"eu-west-1": {"edge": {"min": 0, "max": 3}}}})
    assert group.policy.scale_out_at == 0.6
    assert group.policy.scale_in_below == 0.2
    assert group.regions["eu-west-1"]["edge"].increment == 1
    assert group.launch.capacity == {"origin": 50, "edge": 200}
    assert list(group.pools()) == [("eu-west-1", "edge", PoolLimits(0, 3, 1))]


def test_the_url_name_is_used_when_an_update_body_has_none():
    assert NodeGroup.from_api(example(name=None), "g2").name == "g2"


def test_a_gce_group_in_a_gce_region_with_image_and_size_is_accepted():
    group = NodeGroup.from_api(example(**{
        "launchConfig": {"provider": "gce", "image": "debian-12", "size": "e2-small"},
        "regions": {"europe-west1": {"edge": {"min": 0, "max": 2}}}}))
    assert group.launch.provider == "gce"


def test_a_boot_script_with_known_variables_and_an_escaped_dollar_is_accepted():
    script = "#!/bin/sh\necho $$HOME\nnode-agent --role ${role} --region ${region} --group ${group} --id $node_id\n"
    group = NodeGroup.from_api(example(**{"launchConfig.bootScript": script}))
    assert group.launch.boot_script == script
    assert group.to_api()["launchConfig"]["bootScript"] == script


# -- refusals name the field --------------------------------------------------------------------------
def test_min_over_max_is_refused_naming_the_pool():
    message = refusal(example(**{"regions.us-east-1.edge": {"min": 6, "max": 5}}))
    assert "regions.us-east-1.edge.min" in message and "max" in message


def test_an_unknown_provider_is_refused_naming_the_provider():
    message = refusal(example(**{"launchConfig.provider": "azure"}))
    assert "launchConfig.provider" in message and "azure" in message


def test_an_unknown_region_is_refused_naming_the_region():
    doc = example()
    doc["regions"]["mars-north-1"] = doc["regions"].pop("us-east-1")
    assert "mars-north-1" in refusal(doc)


def test_an_aws_region_is_refused_for_provider_gce():
    doc = example(**{"launchConfig": {"provider": "gce", "image": "debian-12", "size": "e2-small"}})
    message = refusal(doc)
    assert "us-east-1" in message and "gce" in message


def test_a_gce_region_is_refused_for_provider_ec2():
    doc = example(**{"launchConfig": {"provider": "ec2", "image": "ami-1", "size": "t3.small"},
                     "regions": {"us-central1": {"edge": {"min": 0, "max": 1}}}})
    message = refusal(doc)
    assert "us-central1" in message and "ec2" in message


def test_a_cloud_provider_needs_an_image_and_a_size():
    assert "launchConfig.image" in refusal(example(**{"launchConfig": {"provider": "ec2"}}))


@pytest.mark.parametrize("name", ["G1", "a" * 33, "g1-", "1g", "g_1", "", "g1\n", 5, None, ["g1"]],
                         ids=["uppercase", "too-long", "trailing-dash", "leading-digit", "underscore", "empty",
                              "trailing-newline", "integer", "missing", "list"])
def test_a_bad_group_name_is_refused(name):
    assert "group name" in refusal(example(name=name))
    with pytest.raises(GroupError):
        validate_group_name(name)


def test_the_longest_and_shortest_good_names_are_accepted():
    assert validate_group_name("a" * 32) == "a" * 32
    assert validate_group_name("a") == "a"
    assert validate_group_name("edge-pool-2") == "edge-pool-2"


def test_a_body_name_that_differs_from_the_url_is_refused():
    message = refusal(example(name="g1"), "g2")
    assert "g1" in message and "g2" in message


@pytest.mark.parametrize("dotted, value, field", [
    ("regions.us-east-1.edge.min", -1, "regions.us-east-1.edge.min"),
    ("regions.us-east-1.edge.increment", 0, "regions.us-east-1.edge.increment"),
    ("regions.us-east-1.edge.max", 1001, "regions.us-east-1.edge.max"),
    ("launchConfig.capacity.edge", 0, "launchConfig.capacity.edge"),
    ("scalePolicy.evaluationIntervalS", 0, "scalePolicy.evaluationIntervalS"),
    ("scalePolicy.bootTimeoutS", -5, "scalePolicy.bootTimeoutS"),
    ("scalePolicy.failureWindowS", 0, "scalePolicy.failureWindowS"),
    ("scalePolicy.warmUpS", -1, "scalePolicy.warmUpS"),
    ("scalePolicy.coolDownS", -0.5, "scalePolicy.coolDownS"),
    ("scalePolicy.drainTimeoutS", -1, "scalePolicy.drainTimeoutS"),
    ("scalePolicy.failureBudget", 0, "scalePolicy.failureBudget"),
    ("scalePolicy.scaleOutAt", 0, "scalePolicy.scaleOutAt"),
    ("scalePolicy.scaleOutAt", 1.5, "scalePolicy.scaleOutAt"),
    ("scalePolicy.scaleInBelow", -0.1, "scalePolicy.scaleInBelow"),
])
def test_a_negative_zero_or_out_of_range_value_is_refused_naming_the_field(dotted, value, field):
    assert field in refusal(example(**{dotted: value}))


@pytest.mark.parametrize("scale_in", [0.6, 0.7])
def test_scale_in_at_or_above_scale_out_is_refused(scale_in):
    message = refusal(example(**{"scalePolicy.scaleInBelow": scale_in}))
    assert "scaleInBelow" in message and "scaleOutAt" in message


@pytest.mark.parametrize("dotted, value, field", [
    ("regions.us-east-1.edge.min", 1.5, "regions.us-east-1.edge.min"),
    ("regions.us-east-1.edge.max", "5", "regions.us-east-1.edge.max"),
    ("regions.us-east-1.edge.max", True, "regions.us-east-1.edge.max"),
    ("scalePolicy.scaleOutAt", "0.6", "scalePolicy.scaleOutAt"),
    ("scalePolicy.failureBudget", 2.5, "scalePolicy.failureBudget"),
    ("launchConfig.capacity", [50, 200], "launchConfig.capacity"),
    ("launchConfig.media", "ffmpeg", "launchConfig.media"),
    ("launchConfig.image", 7, "launchConfig.image"),
    ("scalePolicy", [], "scalePolicy"),
    ("launchConfig", None, "launchConfig"),
    ("regions", {}, "regions"),
    ("regions.us-east-1", {}, "regions.us-east-1"),
    ("regions.us-east-1.edge", [1, 5], "regions.us-east-1.edge"),
    ("regions.us-east-1.edge.max", None, "regions.us-east-1.edge.max"),
])
def test_a_value_of_the_wrong_kind_or_a_missing_one_is_refused_naming_the_field(dotted, value, field):
    assert field in refusal(example(**{dotted: value}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["scaleOutAt", "evaluationIntervalS", "coolDownS", "drainTimeoutS"])
def test_a_non_finite_number_is_refused(field, value):
    # Flask's JSON parser accepts NaN and Infinity; a stored NaN would be written back as null
    assert f"scalePolicy.{field}" in refusal(example(**{f"scalePolicy.{field}": value}))


@pytest.mark.parametrize("dotted, field", [
    ("scalePolicy.evaluationIntervalS", "evaluationIntervalS"),
    ("scalePolicy.drainTimeoutS", "drainTimeoutS"),
    ("scalePolicy.failureWindowS", "failureWindowS"),
    ("scalePolicy.failureBudget", "failureBudget"),
    ("regions.us-east-1.edge.increment", "increment"),
    ("launchConfig.capacity.edge", "capacity.edge"),
])
def test_an_absurdly_large_value_is_refused_instead_of_breaking_the_controller_or_the_store(dotted, field):
    # 1e308 s overflows the controller's millisecond arithmetic; 10**30 does not fit the JSON codec
    value = 10 ** 30 if dotted.endswith(("Budget", "increment", "edge")) else 1e308
    assert field in refusal(example(**{dotted: value}))


@pytest.mark.parametrize("dotted, unknown", [
    ("flavour", "flavour"),
    ("scalePolicy.scaleOutThreshold", "scaleOutThreshold"),
    ("launchConfig.region", "region"),
    ("launchConfig.capacity.relay", "relay"),
    ("regions.us-east-1.transcoder", "transcoder"),
    ("regions.us-east-1.edge.desired", "desired"),
])
def test_an_unknown_field_is_refused_by_name(dotted, unknown):
    message = refusal(example(**{dotted: 1}))
    assert "unknown field" in message and repr(unknown) in message


def test_a_boot_script_with_an_unknown_variable_is_refused_naming_it():
    message = refusal(example(**{"launchConfig.bootScript": "echo ${role} ${secret_key}"}))
    assert "launchConfig.bootScript" in message and "secret_key" in message


def test_a_boot_script_with_a_broken_placeholder_is_refused():
    assert "launchConfig.bootScript" in refusal(example(**{"launchConfig.bootScript": "echo ${role"}))


def test_a_boot_script_over_16_kb_is_refused():
    assert "launchConfig.bootScript" in refusal(example(**{"launchConfig.bootScript": "#" * (16 * 1024 + 1)}))


@pytest.mark.parametrize("doc", [None, [], "g1", 3])
def test_a_body_that_is_not_an_object_is_refused(doc):
    assert "JSON object" in refusal(doc)


def test_a_group_error_is_a_record_error():
    # the admin API answers every RecordError with a 400
    assert issubclass(GroupError, RecordError)


# -- launch placement ---------------------------------------------------------------------------------
SUBNET_A, SUBNET_B = "subnet-0a1b2c3d4e5f60718", "subnet-0b1c2d3e4f5a60718"
MEDIA_GROUP = "sg-0123456789abcdef0"
NODE_ACCOUNT = "sm-node@my-project.iam.gserviceaccount.com"
NETWORK = "https://www.googleapis.com/compute/v1/projects/my-project/global/networks/sm-gce"


def ec2_group(placement) -> dict:
    return example(**{"launchConfig": {"provider": "ec2", "image": "ami-0abc", "size": "c6i.large",
                                       "placement": placement},
                      "regions": {"us-east-1": {"edge": {"min": 1, "max": 5}},
                                  "eu-west-1": {"edge": {"min": 0, "max": 3}}}})


def gce_group(placement) -> dict:
    return example(**{"launchConfig": {"provider": "gce", "image": "debian-12", "size": "e2-small",
                                       "placement": placement},
                      "regions": {"us-central1": {"edge": {"min": 1, "max": 5}}}})


def test_an_ec2_placement_per_region_is_accepted_with_its_defaults_filled_and_round_trips():
    group = NodeGroup.from_api(ec2_group({
        "us-east-1": {"subnets": [SUBNET_A, SUBNET_B], "securityGroups": [MEDIA_GROUP],
                      "instanceProfile": "arn:aws:iam::123456789012:instance-profile/sm-aws-node", "publicIp": True},
        "eu-west-1": {"subnets": [SUBNET_B], "securityGroups": [MEDIA_GROUP], "instanceProfile": "sm-aws-node"}}))

    placement = group.to_api()["launchConfig"]["placement"]

    assert placement["eu-west-1"] == {"subnets": [SUBNET_B], "securityGroups": [MEDIA_GROUP],
                                      "instanceProfile": "sm-aws-node", "publicIp": True}
    assert placement["us-east-1"]["subnets"] == [SUBNET_A, SUBNET_B]
    assert NodeGroup.from_api(group.to_api()) == group
    assert NodeGroup.from_json(group.to_json()) == group


def test_an_empty_ec2_placement_entry_asks_only_for_a_public_address():
    group = NodeGroup.from_api(ec2_group({"us-east-1": {}}))
    assert group.launch.placement == {"us-east-1": {"subnets": [], "securityGroups": [], "instanceProfile": "",
                                                    "publicIp": True}}


def test_a_gce_placement_is_accepted_with_the_node_accounts_default_scope_and_round_trips():
    group = NodeGroup.from_api(gce_group({"us-central1": {
        "network": NETWORK,
        "subnetwork": "projects/my-project/regions/us-central1/subnetworks/sm-gce-us-central1",
        "serviceAccount": NODE_ACCOUNT}}))

    assert group.launch.placement["us-central1"] == {
        "network": NETWORK, "subnetwork": "projects/my-project/regions/us-central1/subnetworks/sm-gce-us-central1",
        "serviceAccount": NODE_ACCOUNT, "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        "publicIp": True}
    assert NodeGroup.from_api(group.to_api()) == group
    assert NodeGroup.from_json(group.to_json()) == group


def test_a_group_without_placement_shows_none():
    assert "placement" not in NodeGroup.from_api(example()).to_api()["launchConfig"]


@pytest.mark.parametrize("placement, field, why", [
    ([], "launchConfig.placement", "object"),
    ({"us-east-1": "subnet-1"}, "launchConfig.placement.us-east-1", "object"),
    ({"us-east-1": {"subnet": SUBNET_A}}, "launchConfig.placement.us-east-1.", "'subnet'"),
    ({"us-east-1": {"subnets": SUBNET_A}}, "launchConfig.placement.us-east-1.subnets", "list"),
    ({"us-east-1": {"subnets": ["subnet-xyz"]}}, "launchConfig.placement.us-east-1.subnets[0]", "subnet id"),
    ({"us-east-1": {"subnets": [SUBNET_A, SUBNET_A]}}, "launchConfig.placement.us-east-1.subnets", "twice"),
    ({"us-east-1": {"subnets": [f"subnet-{n:017x}" for n in range(17)]}}, "subnets", "at most 16"),
    ({"us-east-1": {"subnets": [SUBNET_A], "securityGroups": ["default"]}},
     "launchConfig.placement.us-east-1.securityGroups[0]", "security group id"),
    ({"us-east-1": {"securityGroups": [MEDIA_GROUP]}}, "launchConfig.placement.us-east-1.securityGroups", "subnets"),
    ({"us-east-1": {"instanceProfile": "arn:aws:iam::123:role/sm-node"}},
     "launchConfig.placement.us-east-1.instanceProfile", "instance profile"),
    ({"us-east-1": {"instanceProfile": "sm node"}}, "launchConfig.placement.us-east-1.instanceProfile", "name"),
    ({"us-east-1": {"publicIp": "yes"}}, "launchConfig.placement.us-east-1.publicIp", "boolean"),
    ({"us-east-1": {"publicIp": 1}}, "launchConfig.placement.us-east-1.publicIp", "boolean"),
    ({"ap-south-1": {}}, "launchConfig.placement.ap-south-1", "not a region of this group"),
    ({"us-central1": {}}, "launchConfig.placement", "not an AWS region"),
])
def test_a_bad_ec2_placement_is_refused_naming_the_field(placement, field, why):
    message = refusal(ec2_group(placement))
    assert field in message and why in message


@pytest.mark.parametrize("entry, field, why", [
    ({"network": "Bad_Net"}, "launchConfig.placement.us-central1.network", "network name or link"),
    ({"network": "sm-gce", "subnetwork": "projects/p1/regions/europe-west1/subnetworks/s"},
     "launchConfig.placement.us-central1.subnetwork", "europe-west1"),
    ({"subnetwork": "sm-gce-us-central1"}, "launchConfig.placement.us-central1.subnetwork", "needs network"),
    ({"network": "sm-gce", "subnetwork": "https://evil.example/subnetworks/x"},
     "launchConfig.placement.us-central1.subnetwork", "subnetwork name or link"),
    ({"serviceAccount": "sm-node@example.com"}, "launchConfig.placement.us-central1.serviceAccount", "e-mail"),
    ({"scopes": ["cloud-platform"]}, "launchConfig.placement.us-central1.scopes", "needs serviceAccount"),
    ({"serviceAccount": NODE_ACCOUNT, "scopes": ["https://example.com/auth/x"]},
     "launchConfig.placement.us-central1.scopes[0]", "OAuth scope"),
    ({"publicIp": None, "externalIp": "ephemeral"}, "launchConfig.placement.us-central1.", "'externalIp'"),
    ({"subnets": [SUBNET_A]}, "launchConfig.placement.us-central1.", "'subnets'"),
])
def test_a_bad_gce_placement_is_refused_naming_the_field(entry, field, why):
    message = refusal(gce_group({"us-central1": entry}))
    assert field in message and why in message


def test_a_placement_for_the_local_provider_is_refused():
    message = refusal(example(**{"launchConfig.placement": {"us-east-1": {}}}))
    assert "launchConfig.placement" in message and "local" in message


# -- codecs -------------------------------------------------------------------------------------------
def test_a_group_survives_its_json_codec_unchanged():
    group = NodeGroup.from_api(example(**{
        "launchConfig.bootScript": "echo ${node_id}",
        "regions.eu-west-1": {"origin": {"min": 0, "max": 3, "increment": 2}},
        "scalePolicy.failureBudget": 5, "scalePolicy.coolDownS": 12.5}))
    assert NodeGroup.from_json(group.to_json()) == group
    assert orjson.loads(group.to_json())["schema"] == 1


def test_a_stored_group_of_another_schema_is_refused():
    doc = orjson.loads(NodeGroup.from_api(example()).to_json())
    doc["schema"] = 99
    with pytest.raises(RecordError, match="schema"):
        NodeGroup.from_json(orjson.dumps(doc))
    with pytest.raises(RecordError):
        NodeGroup.from_json(b"not json")


def test_an_instance_record_survives_its_json_codec_unchanged():
    record = InstanceRecord(id="g1-us-east-1-edge-abc123", group="g1", region="us-east-1", role="edge",
                            provider="local", state=FAILED, provider_id="i-42", created_ms=1, state_since_ms=2,
                            registered_ms=3, drain_deadline_ms=4, failure="boot timeout", reason="did not register")
    assert InstanceRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("data", [b"[]", b"nope", b'{"schema": 1, "id": "x"}', b'{"schema": 2}',
                                  b'{"schema": 1, "id": "x", "group": "g", "region": "r", "role": "edge", '
                                  b'"provider": "local", "colour": "red"}'])
def test_a_bad_instance_record_is_a_record_error(data):
    with pytest.raises(RecordError):
        InstanceRecord.from_json(data)


def test_an_instance_record_refuses_an_unknown_state_or_role():
    with pytest.raises(RecordError):
        InstanceRecord(id="x", group="g", region="r", role="edge", provider="local", state="sleeping")
    with pytest.raises(RecordError):
        InstanceRecord(id="x", group="g", region="r", role="relay", provider="local")


def test_moving_an_instance_stamps_its_state_time_and_reason():
    record = InstanceRecord(id="x", group="g", region="r", role="edge", provider="local", state="starting")
    moved = record.moved("inservice", 1234, "registered", registered_ms=1234)
    assert (moved.state, moved.state_since_ms, moved.reason, moved.registered_ms) == (
        "inservice", 1234, "registered", 1234)
    assert record.state == "starting"
