"""The ec2 and gce providers create, list and destroy tagged instances with their boot scripts.

EC2 runs against a real local ``moto_server`` (with AMI and instance type validation on, as on AWS);
GCE runs against ``tests.fakes.gce_api``, a small stateful fake of the Compute REST API (GCE has no
emulator). What a provider sent is read back from the cloud's side: boto3 against moto, the fake's state.
"""
from __future__ import annotations

import base64

import boto3
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from streammanager.cloud.base import (DEFAULT_BOOT_SCRIPT, TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE,
                                      LaunchRequest, ProviderError, render_boot_script)
from streammanager.cloud.ec2 import Ec2Provider
from streammanager.cloud.gce import GceProvider
from streammanager.zookeeper import free_port
from tests.conftest import BIN, Proc, wait_until
from tests.fakes.gce_api import FakeComputeApi

EC2_KEY_ID = "AKIDSTREAMMANAGER"
EC2_SECRET = "ec2-secret-never-printed-0123456789"
AMI = "ami-785db401"  # one of the default AMIs moto loads into every region
GCE_PROJECT = "sm-test"
GCE_ACCOUNT = "sm-controller@sm-test.iam.gserviceaccount.com"
DEBIAN_12 = "projects/debian-cloud/global/images/family/debian-12"


def launch_request(name: str, cluster_id: str, region: str, image: str, size: str, role: str = "edge",
                   group: str = "g1") -> LaunchRequest:
    script = render_boot_script(DEFAULT_BOOT_SCRIPT, package="streammanager==0.1.0",
                                zk_hosts="10.0.0.5:2181,10.0.0.6:2181", zk_root="/streammanager", role=role,
                                region=region, group=group, capacity=200, media="nginx", node_id=name,
                                cluster_id=cluster_id)
    return LaunchRequest(cluster_id=cluster_id, group=group, region=region, role=role, name=name, image=image,
                         size=size, boot_script=script, capacity=200)


# -- EC2 against moto_server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """(host, port, secure) of a moto_server started for this module, stopped by PID at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {"MOTO_ENABLE_AMI_VALIDATION": "true", "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true"}
    proc = Proc([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env, log_path=log_path)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/moto-api/data.json") or proc.popen.poll() is not None,
                   20, what="moto_server to answer")
        assert proc.popen.poll() is None, proc.log()
        yield "127.0.0.1", port, False
    finally:
        proc.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=0.5).ok
    except requests.RequestException:
        return False


@pytest.fixture
def ec2(moto):
    host, port, _ = moto
    requests.post(f"http://{host}:{port}/moto-api/reset", timeout=5).raise_for_status()
    provider = Ec2Provider(EC2_KEY_ID, EC2_SECRET, "eu-west-1", endpoint=moto)
    yield provider
    provider.close()


def boto3_ec2(moto, region: str):
    host, port, _ = moto
    return boto3.client("ec2", region_name=region, endpoint_url=f"http://{host}:{port}",
                        aws_access_key_id=EC2_KEY_ID, aws_secret_access_key=EC2_SECRET)


def ec2_instance(moto, region: str, instance_id: str) -> dict:
    reservations = boto3_ec2(moto, region).describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]


def test_ec2_launch_tags_the_instance_and_passes_the_boot_script(ec2, moto):
    request = launch_request("edge-eu-1", "c1", "eu-west-1", AMI, "t3.micro")

    instance = ec2.launch(request)

    assert (instance.name, instance.cluster_id, instance.group, instance.region, instance.role) == \
        ("edge-eu-1", "c1", "g1", "eu-west-1", "edge")
    assert instance.state in ("pending", "running") and instance.address
    described = ec2_instance(moto, "eu-west-1", instance.id)
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        "Name": "edge-eu-1", TAG_CLUSTER: "c1", TAG_GROUP: "g1", TAG_REGION: "eu-west-1", TAG_ROLE: "edge"}
    assert (described["ImageId"], described["InstanceType"]) == (AMI, "t3.micro")
    user_data = boto3_ec2(moto, "eu-west-1").describe_instance_attribute(
        InstanceId=instance.id, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(user_data).decode()
    assert script == request.boot_script
    assert "--role edge --region eu-west-1 --group g1" in script
    assert "AGENT_ZK_HOSTS=10.0.0.5:2181,10.0.0.6:2181" in script


def test_ec2_list_instances_returns_only_this_clusters_instances(ec2):
    ours = [ec2.launch(launch_request(f"edge-{n}", "c1", "eu-west-1", AMI, "t3.micro")) for n in (1, 2)]
    ec2.launch(launch_request("edge-other", "c2", "eu-west-1", AMI, "t3.micro"))

    listed = ec2.list_instances("c1")

    assert sorted(i.id for i in listed) == sorted(i.id for i in ours)
    assert {i.cluster_id for i in listed} == {"c1"}
    assert [i.name for i in ec2.list_instances("c2")] == ["edge-other"]


def test_ec2_destroy_removes_the_instance_and_a_second_destroy_returns_false(ec2, moto):
    instance = ec2.launch(launch_request("edge-1", "c1", "eu-west-1", AMI, "t3.micro"))

    assert ec2.destroy(instance.id, "c1") is True

    assert ec2_instance(moto, "eu-west-1", instance.id)["State"]["Name"] in ("shutting-down", "terminated")
    assert ec2.list_instances("c1") == []
    assert ec2.destroy(instance.id, "c1") is False
    assert ec2.destroy("i-0123456789abcdef0", "c1") is False


def test_ec2_destroy_refuses_another_clusters_instance(ec2, moto):
    theirs = ec2.launch(launch_request("edge-theirs", "c2", "eu-west-1", AMI, "t3.micro"))

    with pytest.raises(ProviderError, match="belongs to cluster 'c2'"):
        ec2.destroy(theirs.id, "c1")

    assert ec2_instance(moto, "eu-west-1", theirs.id)["State"]["Name"] in ("pending", "running")


def test_ec2_instances_in_two_regions_are_listed_and_destroyed_by_a_fresh_provider(ec2, moto):
    eu = ec2.launch(launch_request("origin-eu", "c1", "eu-west-1", AMI, "t3.micro", role="origin"))
    us = ec2.launch(launch_request("edge-us", "c1", "us-east-1", AMI, "t3.small"))

    assert {(i.id, i.region) for i in ec2.list_instances("c1")} == {(eu.id, "eu-west-1"), (us.id, "us-east-1")}
    assert ec2_instance(moto, "us-east-1", us.id)["Placement"]["AvailabilityZone"].startswith("us-east-1")

    # a restarted controller knows the group's regions, not the instances
    fresh = Ec2Provider(EC2_KEY_ID, EC2_SECRET, "eu-west-1", endpoint=moto, regions=["us-east-1"])
    assert {i.id for i in fresh.list_instances("c1")} == {eu.id, us.id}
    assert fresh.destroy(us.id, "c1") is True
    assert [i.id for i in fresh.list_instances("c1")] == [eu.id]


@pytest.mark.parametrize("image, size, error", [
    ("ami-0badbadbadbadbad0", "t3.micro", "InvalidAMIID"),
    (AMI, "t9.imaginary", "InvalidInstanceType"),
])
def test_ec2_a_bad_image_or_size_becomes_provider_error(ec2, image, size, error):
    with pytest.raises(ProviderError, match=error) as raised:
        ec2.launch(launch_request("edge-bad", "c1", "eu-west-1", image, size))

    assert EC2_SECRET not in str(raised.value)
    assert ec2.list_instances("c1") == []


def test_ec2_an_unknown_region_becomes_provider_error(ec2):
    with pytest.raises(ProviderError, match="mars-1"):
        ec2.launch(launch_request("edge-bad", "c1", "mars-1", AMI, "t3.micro"))


# -- GCE against the fake Compute API ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gce_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


@pytest.fixture(scope="module")
def gce_api(gce_key):
    api = FakeComputeApi(service_accounts={GCE_ACCOUNT: gce_key[1]}).start("127.0.0.1", free_port())
    yield api
    api.stop()


@pytest.fixture
def gce(gce_api, gce_key):
    gce_api.reset()
    provider = GceProvider(GCE_ACCOUNT, gce_key[0], GCE_PROJECT, zones={"europe-west1": "europe-west1-b"},
                           endpoint=(gce_api.host, gce_api.port, False))
    yield provider
    provider.close()


def test_gce_launch_labels_the_instance_and_passes_the_boot_script(gce, gce_api):
    request = launch_request("edge-us-1", "c1", "us-central1", DEBIAN_12, "e2-small")

    instance = gce.launch(request)

    assert (instance.id, instance.cluster_id, instance.group, instance.region, instance.role) == \
        ("edge-us-1", "c1", "g1", "us-central1", "edge")
    assert instance.state == "running" and instance.extra["zone"] == "us-central1-a"
    stored = gce_api.instance(GCE_PROJECT, "us-central1-a", "edge-us-1")
    assert stored["labels"] == {TAG_CLUSTER: "c1", TAG_GROUP: "g1", TAG_REGION: "us-central1", TAG_ROLE: "edge"}
    assert stored["metadata"]["items"] == [{"key": "startup-script", "value": request.boot_script}]
    assert stored["machineType"].endswith("/zones/us-central1-a/machineTypes/e2-small")
    boot_disk = gce_api.disks[(GCE_PROJECT, "us-central1-a")]["edge-us-1"]
    assert boot_disk["sourceImage"].endswith("/projects/debian-cloud/global/images/debian-12-bookworm-v20240910")


def test_gce_list_instances_returns_only_this_clusters_instances(gce):
    ours = [gce.launch(launch_request(f"edge-{n}", "c1", "us-central1", DEBIAN_12, "e2-small")) for n in (1, 2)]
    gce.launch(launch_request("edge-other", "c2", "us-central1", DEBIAN_12, "e2-small"))

    listed = gce.list_instances("c1")

    assert sorted(i.id for i in listed) == sorted(i.id for i in ours)
    assert {i.cluster_id for i in listed} == {"c1"}
    assert [i.id for i in gce.list_instances("c2")] == ["edge-other"]


def test_gce_destroy_removes_the_instance_and_a_second_destroy_returns_false(gce, gce_api):
    gce.launch(launch_request("edge-1", "c1", "us-central1", DEBIAN_12, "e2-small"))

    assert gce.destroy("edge-1", "c1") is True

    assert gce_api.instance(GCE_PROJECT, "us-central1-a", "edge-1") is None
    assert "edge-1" not in gce_api.disks.get((GCE_PROJECT, "us-central1-a"), {})  # its boot disk went too
    assert gce.list_instances("c1") == []
    assert gce.destroy("edge-1", "c1") is False
    assert gce.destroy("never-launched", "c1") is False


def test_gce_destroy_refuses_another_clusters_instance(gce, gce_api):
    gce.launch(launch_request("edge-theirs", "c2", "us-central1", DEBIAN_12, "e2-small"))

    with pytest.raises(ProviderError, match="belongs to cluster 'c2'"):
        gce.destroy("edge-theirs", "c1")

    assert gce_api.instance(GCE_PROJECT, "us-central1-a", "edge-theirs") is not None


def test_gce_instances_in_two_regions_go_to_their_zones(gce, gce_api):
    gce.launch(launch_request("origin-us", "c1", "us-central1", DEBIAN_12, "e2-medium", role="origin"))
    gce.launch(launch_request("edge-eu", "c1", "europe-west1", DEBIAN_12, "e2-small"))

    listed = {i.id: (i.region, i.extra["zone"]) for i in gce.list_instances("c1")}

    assert listed == {"origin-us": ("us-central1", "us-central1-a"), "edge-eu": ("europe-west1", "europe-west1-b")}
    assert gce_api.instance(GCE_PROJECT, "europe-west1-b", "edge-eu")["labels"][TAG_REGION] == "europe-west1"
    assert gce.destroy("edge-eu", "c1") is True
    assert [i.id for i in gce.list_instances("c1")] == ["origin-us"]


@pytest.mark.parametrize("image, size, error", [
    ("projects/debian-cloud/global/images/no-such-image", "e2-small", "no-such-image"),
    (DEBIAN_12, "e9-imaginary", "e9-imaginary"),
])
def test_gce_a_bad_image_or_size_becomes_provider_error(gce, gce_api, image, size, error):
    with pytest.raises(ProviderError, match=error):
        gce.launch(launch_request("edge-bad", "c1", "us-central1", image, size))

    assert gce.list_instances("c1") == []


def test_gce_a_label_value_gce_would_refuse_becomes_provider_error_before_any_call(gce, gce_api):
    with pytest.raises(ProviderError, match="label values"):
        gce.launch(launch_request("edge-bad", "Cluster.One", "us-central1", DEBIAN_12, "e2-small"))

    assert not any(method == "POST" and path.endswith("/instances") for method, path in gce_api.requests)


def test_gce_a_key_the_token_endpoint_refuses_becomes_provider_error_without_the_key(gce_api):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    provider = GceProvider(GCE_ACCOUNT, other_key, GCE_PROJECT, endpoint=(gce_api.host, gce_api.port, False))

    with pytest.raises(ProviderError, match="Signature") as raised:
        provider.list_instances("c1")

    assert "PRIVATE KEY" not in str(raised.value)
