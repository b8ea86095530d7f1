"""The ec2 and gce providers create, list and destroy tagged instances with their boot scripts.

EC2 runs against a real local ``moto_server`` (with AMI and instance type validation on, as on AWS);
GCE runs against ``tests.fakes.gce_api``, a small stateful fake of the Compute REST API (GCE has no
emulator). What a provider sent is read back from the cloud's side: boto3 against moto, the fake's state.

Credentials without keys are tested on loopback only: AWS's chain with environment variables or with a
fake instance metadata service (IMDSv2) on 127.0.0.1, GCE's metadata server played by the fake. Every
test runs with AWS_EC2_METADATA_DISABLED unless it points the chain at that fake, so nothing ever asks
169.254.169.254 or metadata.google.internal.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from libcloud.http import LibcloudConnection
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from streammanager.cloud import build_providers
from streammanager.cloud.base import (DEFAULT_BOOT_SCRIPT, TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE,
                                      LaunchRequest, ProviderError, render_boot_script)
from streammanager.cloud.ec2 import AwsCredentials, Ec2Provider
from streammanager.cloud.gce import GceProvider, MetadataServerToken
from streammanager.config import ControllerSettings
from streammanager.zookeeper import free_port
from tests.conftest import BIN, Proc, wait_until
from tests.fakes.gce_api import FakeComputeApi

EC2_KEY_ID = "AKIDSTREAMMANAGER"
EC2_SECRET = "ec2-secret-never-printed-0123456789"
AMI = "ami-785db401"  # one of the default AMIs moto loads into every region
GCE_PROJECT = "sm-test"
GCE_ACCOUNT = "sm-controller@sm-test.iam.gserviceaccount.com"
GCE_NODE_ACCOUNT = "sm-node@sm-test.iam.gserviceaccount.com"
GCE_VM_ACCOUNT = "sm-vm-controller@sm-test.iam.gserviceaccount.com"  # the account of the controller's VM
GCE_NETWORK_LINK = f"https://www.googleapis.com/compute/v1/projects/{GCE_PROJECT}/global/networks/sm-net"
DEBIAN_12 = "projects/debian-cloud/global/images/family/debian-12"
# AWS's credential chain: these variables decide where botocore looks; every test starts without them
AWS_CHAIN_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                       "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                       "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")


def launch_request(name: str, cluster_id: str, region: str, image: str, size: str, role: str = "edge",
                   group: str = "g1", placement: dict | None = None) -> LaunchRequest:
    script = render_boot_script(DEFAULT_BOOT_SCRIPT, package="streammanager==0.1.0",
                                zk_hosts="10.0.0.5:2181,10.0.0.6:2181", zk_root="/streammanager", zk_auth="", role=role,
                                region=region, group=group, capacity=200, media="nginx", node_id=name,
                                cluster_id=cluster_id)
    return LaunchRequest(cluster_id=cluster_id, group=group, region=region, role=role, name=name, image=image,
                         size=size, boot_script=script, capacity=200, placement=placement or {})


@pytest.fixture(autouse=True)
def no_ambient_aws_credentials(monkeypatch, tmp_path):
    """AWS's chain finds nothing of this machine's (files, variables) and never asks a metadata service."""
    for name in AWS_CHAIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def sent(monkeypatch):
    """(method, url, headers) of every HTTP request libcloud sends, in order."""
    requests_sent = []
    original = LibcloudConnection.request

    def record(self, method, url, body=None, headers=None, **kwargs):
        requests_sent.append((method, url, {k.lower(): v for k, v in (headers or {}).items()}))
        return original(self, method, url, body=body, headers=headers, **kwargs)

    monkeypatch.setattr(LibcloudConnection, "request", record)
    return requests_sent


def session_tokens(sent_requests) -> set[str | None]:
    """The AWS session tokens the requests were signed with (None: none)."""
    return {headers.get("x-amz-security-token") for _, _, headers in sent_requests}


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


def boto3_ec2(moto, region: str, service: str = "ec2"):
    host, port, _ = moto
    return boto3.client(service, region_name=region, endpoint_url=f"http://{host}:{port}",
                        aws_access_key_id=EC2_KEY_ID, aws_secret_access_key=EC2_SECRET)


@pytest.fixture
def node_network(moto):
    """What Terraform prepares for media nodes in eu-west-1: a VPC, two subnets in two zones, the media
    security group, the node instance profile. Returns their ids."""
    ec2, iam = boto3_ec2(moto, "eu-west-1"), boto3_ec2(moto, "eu-west-1", "iam")
    vpc = ec2.create_vpc(CidrBlock="10.50.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.50.{n}.0/24", AvailabilityZone=f"eu-west-1{zone}")
               ["Subnet"]["SubnetId"] for n, zone in ((1, "a"), (2, "b"))]
    group = ec2.create_security_group(GroupName="sm-media", Description="media nodes", VpcId=vpc)["GroupId"]
    iam.create_role(RoleName="sm-node", AssumeRolePolicyDocument="{}")
    profile = iam.create_instance_profile(InstanceProfileName="sm-node")["InstanceProfile"]["Arn"]
    iam.add_role_to_instance_profile(InstanceProfileName="sm-node", RoleName="sm-node")
    return {"vpc": vpc, "subnets": subnets, "group": group, "profile_arn": profile}


def ec2_instance(moto, region: str, instance_id: str) -> dict:
    """EC2's own description of an instance; our ids are ``region/i-...``."""
    assert instance_id.startswith(region + "/")
    reservations = boto3_ec2(moto, region).describe_instances(
        InstanceIds=[instance_id.rpartition("/")[2]])["Reservations"]
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
        InstanceId=instance.extra["instance_id"], Attribute="userData")["UserData"]["Value"]
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
    # when each was made: the sweep leaves a young untracked instance alone (it destroyed them at once)
    assert all(abs(i.extra["created_ms"] - time.time() * 1000) < 300_000 for i in listed), listed


@pytest.mark.parametrize("region", ["ca-west-1", "il-central-1"])
def test_ec2_launches_lists_and_destroys_in_a_region_newer_than_libclouds_table(ec2, moto, region):
    # libcloud 3.9 refuses regions it did not know at release: a group there could never launch, and
    # listing the region failed the controller's whole sweep
    instance = ec2.launch(launch_request("edge-new", "c1", region, AMI, "t3.micro"))

    assert instance.region == region
    assert ec2_instance(moto, region, instance.id)["Placement"]["AvailabilityZone"].startswith(region)
    assert [i.id for i in ec2.list_instances("c1")] == [instance.id]
    assert ec2.destroy(instance.id, "c1") is True


# moto answers 500 for a region it does not have, as AWS refuses to list a region the account has not
# opted into: a region that cannot be listed
UNLISTABLE_REGION = "xx-nowhere-1"


def test_ec2_listing_answers_the_regions_that_answered_and_names_the_one_that_did_not(ec2):
    ours = ec2.launch(launch_request("edge-1", "c1", "eu-west-1", AMI, "t3.micro"))
    ec2.know_regions([UNLISTABLE_REGION])

    listing = ec2.listing("c1")

    assert [i.id for i in listing.instances] == [ours.id]
    assert list(listing.unlisted) == [UNLISTABLE_REGION] and "500" in listing.unlisted[UNLISTABLE_REGION]
    with pytest.raises(ProviderError, match=UNLISTABLE_REGION):  # all or nothing for other callers
        ec2.list_instances("c1")


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


def test_ec2_a_restarted_controller_destroys_an_instance_in_a_region_it_was_not_told_about(ec2, moto):
    eu = ec2.launch(launch_request("origin-eu", "c1", "eu-west-1", AMI, "t3.micro", role="origin"))
    fresh = Ec2Provider(EC2_KEY_ID, EC2_SECRET, "us-east-1", endpoint=moto)  # home region only
    assert fresh.destroy(eu.id, "c1") is True  # the id says where it is
    assert ec2_instance(moto, "eu-west-1", eu.id)["State"]["Name"] in ("shutting-down", "terminated")


def test_ec2_lists_instances_in_the_regions_the_controller_names(ec2, moto):
    eu = ec2.launch(launch_request("origin-eu", "c1", "eu-west-1", AMI, "t3.micro", role="origin"))
    fresh = Ec2Provider(EC2_KEY_ID, EC2_SECRET, "us-east-1", endpoint=moto)
    assert fresh.list_instances("c1") == []
    fresh.know_regions(["eu-west-1"])  # the controller's sweep names its groups' regions
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


# -- EC2 placement: subnet, security groups, instance profile, public address -------------------------

def test_ec2_launch_puts_the_instance_in_a_placement_subnet_with_its_groups_profile_and_a_public_ip(
        ec2, moto, node_network):
    placement = {"subnets": node_network["subnets"], "securityGroups": [node_network["group"]],
                 "instanceProfile": "sm-node", "publicIp": True}

    instance = ec2.launch(launch_request("edge-eu-1", "c1", "eu-west-1", AMI, "t3.micro", placement=placement))

    described = ec2_instance(moto, "eu-west-1", instance.id)
    chosen = node_network["subnets"][zlib.crc32(b"edge-eu-1") % 2]
    assert (described["SubnetId"], described["VpcId"]) == (chosen, node_network["vpc"])
    assert [g["GroupId"] for g in described["NetworkInterfaces"][0]["Groups"]] == [node_network["group"]]
    assert described["IamInstanceProfile"]["Arn"] == node_network["profile_arn"]
    assert described["PublicIpAddress"] and instance.address == described["PublicIpAddress"]
    assert instance.extra["subnet_id"] == chosen


def test_ec2_a_pool_spreads_over_the_placement_subnets(ec2, moto, node_network):
    placement = {"subnets": node_network["subnets"], "securityGroups": [node_network["group"]], "publicIp": True}

    instances = [ec2.launch(launch_request(f"edge-{n}", "c1", "eu-west-1", AMI, "t3.micro", placement=placement))
                 for n in range(6)]

    zones = {ec2_instance(moto, "eu-west-1", i.id)["Placement"]["AvailabilityZone"] for i in instances}
    assert zones == {"eu-west-1a", "eu-west-1b"}


def test_ec2_without_a_public_ip_request_the_instance_has_only_its_private_address(ec2, moto, node_network):
    placement = {"subnets": node_network["subnets"][:1], "securityGroups": [node_network["group"]],
                 "instanceProfile": node_network["profile_arn"], "publicIp": False}

    instance = ec2.launch(launch_request("edge-private", "c1", "eu-west-1", AMI, "t3.micro", placement=placement))

    described = ec2_instance(moto, "eu-west-1", instance.id)
    assert "PublicIpAddress" not in described and instance.address == described["PrivateIpAddress"]
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [node_network["group"]]
    assert described["IamInstanceProfile"]["Arn"] == node_network["profile_arn"]


def test_ec2_a_subnet_the_account_does_not_have_becomes_provider_error(ec2):
    placement = {"subnets": ["subnet-0123456789abcdef0"], "publicIp": True}

    with pytest.raises(ProviderError, match="subnet-0123456789abcdef0"):
        ec2.launch(launch_request("edge-lost", "c1", "eu-west-1", AMI, "t3.micro", placement=placement))


# -- EC2 credentials without keys: AWS's chain ------------------------------------------------------

def test_ec2_without_keys_signs_with_the_session_credentials_of_the_environment(moto, monkeypatch, sent):
    requests.post(f"http://{moto[0]}:{moto[1]}/moto-api/reset", timeout=5).raise_for_status()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAENVIRONMENT0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret-never-printed")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "environment-session-token")
    provider = Ec2Provider(None, None, "eu-west-1", endpoint=moto)

    instance = provider.launch(launch_request("edge-env", "c1", "eu-west-1", AMI, "t3.micro"))

    assert ec2_instance(moto, "eu-west-1", instance.id)["State"]["Name"] in ("pending", "running")
    assert session_tokens(sent) == {"environment-session-token"}
    assert all("ASIAENVIRONMENT0001" in headers["authorization"] for _, _, headers in sent)
    assert "environment-secret" not in repr(provider)


class FakeInstanceMetadata:
    """IMDSv2 as an EC2 instance with a role sees it: ``PUT /latest/api/token`` gives a session token,
    which every GET must carry (401 otherwise); the role's name and its temporary credentials are under
    ``/latest/meta-data/iam/security-credentials/``. Serves 127.0.0.1 only."""

    ROLE = "sm-controller"

    def __init__(self):
        self.session_token = secrets.token_urlsafe(16)
        self.issued: list[dict] = []
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, carried the session token)
        self._server = make_server("127.0.0.1", 0, self.wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def wsgi(self, environ, start_response):
        request = Request(environ)
        with_token = request.headers.get("X-aws-ec2-metadata-token") == self.session_token
        self.requests.append((request.method, request.path, with_token))
        base = "/latest/meta-data/iam/security-credentials/"
        if request.method == "PUT" and request.path == "/latest/api/token":
            response = Response(self.session_token)
        elif not with_token:
            response = Response("", status=401)
        elif request.path == base:
            response = Response(self.ROLE)
        elif request.path == base + self.ROLE:
            expiry = (datetime.now(timezone.utc) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
            credentials = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": f"ASIAROLE{len(self.issued):04d}",
                           "SecretAccessKey": secrets.token_urlsafe(30), "Token": secrets.token_urlsafe(40),
                           "Expiration": expiry, "LastUpdated": expiry}
            self.issued.append(credentials)
            response = Response(json.dumps(credentials), content_type="application/json")
        else:
            response = Response("", status=404)
        return response(environ, start_response)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def test_ec2_on_an_instance_signs_with_its_role_credentials_from_imdsv2(moto, monkeypatch, sent):
    requests.post(f"http://{moto[0]}:{moto[1]}/moto-api/reset", timeout=5).raise_for_status()
    with FakeInstanceMetadata() as imds:
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
        provider = Ec2Provider(None, None, "eu-west-1", endpoint=moto)

        instance = provider.launch(launch_request("edge-role", "c1", "eu-west-1", AMI, "t3.micro"))
        listed = provider.list_instances("c1")

    assert [i.id for i in listed] == [instance.id]
    assert imds.requests[0] == ("PUT", "/latest/api/token", False)  # IMDSv2: a session first
    assert all(with_token for method, _, with_token in imds.requests if method == "GET")
    [role_credentials] = imds.issued
    assert session_tokens(sent) == {role_credentials["Token"]}
    assert role_credentials["SecretAccessKey"] not in repr(provider)


class RotatingCredentials:
    """A credential source whose temporary credentials are replaced on demand (as a refresh does)."""

    def __init__(self):
        self.generation = 0

    def rotate(self) -> None:
        self.generation += 1

    def current(self) -> AwsCredentials:
        return AwsCredentials(f"ASIAROTATING{self.generation:04d}", f"secret-{self.generation}",
                              f"token-{self.generation}")


def test_ec2_signs_with_refreshed_credentials_as_soon_as_the_source_has_them(moto, sent):
    requests.post(f"http://{moto[0]}:{moto[1]}/moto-api/reset", timeout=5).raise_for_status()
    source = RotatingCredentials()
    provider = Ec2Provider(None, None, "eu-west-1", endpoint=moto, credentials=source)
    first = provider.launch(launch_request("edge-1", "c1", "eu-west-1", AMI, "t3.micro"))
    assert session_tokens(sent) == {"token-0"}
    sent.clear()

    source.rotate()
    assert provider.destroy(first.id, "c1") is True

    assert session_tokens(sent) == {"token-1"}


def test_ec2_without_keys_and_without_any_credentials_becomes_provider_error(moto):
    provider = Ec2Provider(None, None, "eu-west-1", endpoint=moto)

    with pytest.raises(ProviderError, match="no credentials"):
        provider.list_instances("c1")


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
    subnetworks = {("us-central1", "default"): "default", ("europe-west1", "default"): "default",
                   ("us-central1", "sm-us-central1"): "sm-net", ("europe-west1", "sm-europe-west1"): "sm-net"}
    api = FakeComputeApi(service_accounts={GCE_ACCOUNT: gce_key[1]}, networks=("default", "sm-net"),
                         subnetworks=subnetworks, instance_accounts={GCE_NODE_ACCOUNT}, vm_account=GCE_VM_ACCOUNT)
    api.start("127.0.0.1", free_port())
    yield api
    api.stop()


def metadata_url(api: FakeComputeApi) -> str:
    return f"http://{api.host}:{api.port}/computeMetadata/v1"


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
    # when each was made: the sweep leaves a young untracked instance alone (it destroyed them at once)
    assert all(abs(i.extra["created_ms"] - time.time() * 1000) < 300_000 for i in listed), listed


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


# -- GCE placement: network, subnetwork, the node's service account, external address -------------------

def node_placement(region: str, **changes) -> dict:
    placement = {"network": GCE_NETWORK_LINK,
                 "subnetwork": f"projects/{GCE_PROJECT}/regions/{region}/subnetworks/sm-{region}",
                 "serviceAccount": GCE_NODE_ACCOUNT, "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                 "publicIp": True}
    placement.update(changes)
    return placement


def test_gce_launch_puts_the_instance_in_the_placement_subnetwork_running_as_the_node_account(gce, gce_api):
    request = launch_request("edge-us-1", "c1", "us-central1", DEBIAN_12, "e2-small",
                             placement=node_placement("us-central1"))

    instance = gce.launch(request)

    stored = gce_api.instance(GCE_PROJECT, "us-central1-a", "edge-us-1")
    [nic] = stored["networkInterfaces"]
    assert nic["network"] == GCE_NETWORK_LINK
    assert nic["subnetwork"].endswith(f"/projects/{GCE_PROJECT}/regions/us-central1/subnetworks/sm-us-central1")
    assert [config["type"] for config in nic["accessConfigs"]] == ["ONE_TO_ONE_NAT"]
    assert stored["serviceAccounts"] == [{"email": GCE_NODE_ACCOUNT,
                                          "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    assert instance.extra["service_accounts"] == [GCE_NODE_ACCOUNT]
    assert instance.address == nic["accessConfigs"][0]["natIP"]


def test_gce_a_subnetwork_name_is_taken_in_the_instances_region_and_short_scopes_are_expanded(gce, gce_api):
    placement = node_placement("europe-west1", network="sm-net", subnetwork="sm-europe-west1",
                               scopes=["logging-write", "monitoring-write"])

    gce.launch(launch_request("edge-eu-1", "c1", "europe-west1", DEBIAN_12, "e2-small", placement=placement))

    stored = gce_api.instance(GCE_PROJECT, "europe-west1-b", "edge-eu-1")
    assert stored["networkInterfaces"][0]["subnetwork"].endswith("/regions/europe-west1/subnetworks/sm-europe-west1")
    assert stored["serviceAccounts"][0]["scopes"] == ["https://www.googleapis.com/auth/logging.write",
                                                      "https://www.googleapis.com/auth/monitoring.write"]


def test_gce_without_a_public_ip_the_instance_has_no_external_address(gce, gce_api):
    placement = node_placement("us-central1", publicIp=False)

    instance = gce.launch(launch_request("edge-private", "c1", "us-central1", DEBIAN_12, "e2-small",
                                         placement=placement))

    assert "accessConfigs" not in gce_api.instance(GCE_PROJECT, "us-central1-a", "edge-private")["networkInterfaces"][0]
    assert instance.address == instance.extra["private_ip"]


@pytest.mark.parametrize("changes, error", [
    ({"subnetwork": f"projects/{GCE_PROJECT}/regions/us-central1/subnetworks/default"}, "does not belong"),
    ({"serviceAccount": "stranger@sm-test.iam.gserviceaccount.com"}, "stranger@sm-test"),
])
def test_gce_a_placement_the_api_refuses_becomes_provider_error(gce, gce_api, changes, error):
    with pytest.raises(ProviderError, match=error):
        gce.launch(launch_request("edge-bad", "c1", "us-central1", DEBIAN_12, "e2-small",
                                  placement=node_placement("us-central1", **changes)))

    assert gce.list_instances("c1") == []


# -- GCE credentials without a key: the VM's service account through the metadata server -----------------

def test_gce_with_metadata_auth_uses_the_vms_token_and_no_key(gce_api):
    gce_api.reset()
    provider = GceProvider.with_metadata_auth(GCE_PROJECT, metadata_url=metadata_url(gce_api),
                                              endpoint=(gce_api.host, gce_api.port, False))

    provider.launch(launch_request("edge-1", "c1", "us-central1", DEBIAN_12, "e2-small",
                                   placement=node_placement("us-central1")))

    assert [i.id for i in provider.list_instances("c1")] == ["edge-1"]
    token_calls = [path for method, path in gce_api.requests if "/token" in path]
    assert token_calls == ["/computeMetadata/v1/instance/service-accounts/default/token"]
    assert {account for account, _ in gce_api.tokens.values()} >= {GCE_VM_ACCOUNT}


def test_gce_metadata_auth_on_a_vm_without_that_service_account_becomes_provider_error(gce_api):
    provider = GceProvider.with_metadata_auth(GCE_PROJECT, service_account="other@sm-test.iam.gserviceaccount.com",
                                              metadata_url=metadata_url(gce_api),
                                              endpoint=(gce_api.host, gce_api.port, False))

    with pytest.raises(ProviderError, match="metadata server refused a token"):
        provider.list_instances("c1")


def test_a_metadata_token_is_reused_until_shortly_before_it_expires_then_fetched_again(gce_api):
    gce_api.reset()
    now = [1000.0]
    token = MetadataServerToken(metadata_url(gce_api), refresh_margin_s=60.0, clock=lambda: now[0])

    first = token.access_token
    now[0] += gce_api.token_lifetime_s - 61
    assert token.access_token == first
    now[0] += 2
    second = token.access_token

    assert second != first
    assert sum(1 for _, path in gce_api.requests if path.startswith("/computeMetadata/")) == 2


def test_a_metadata_server_that_does_not_answer_becomes_provider_error():
    provider = GceProvider.with_metadata_auth(GCE_PROJECT, metadata_url=f"http://127.0.0.1:{free_port()}/v1",
                                              endpoint=("127.0.0.1", free_port(), False))

    with pytest.raises(ProviderError, match="metadata server did not answer"):
        provider.list_instances("c1")


# -- the controller's settings choose the credentials ------------------------------------------------------

def controller_settings(tmp_path, **env) -> ControllerSettings:
    return ControllerSettings.from_env({"SM_LOCAL_STATE_DIR": str(tmp_path / "local"), **env})


def test_ec2_instance_role_settings_make_an_ec2_provider_without_keys(tmp_path, moto, monkeypatch):
    requests.post(f"http://{moto[0]}:{moto[1]}/moto-api/reset", timeout=5).raise_for_status()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAENVIRONMENT0002")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    settings = controller_settings(tmp_path, SM_EC2_CREDENTIALS="instance-role", SM_EC2_REGION="eu-west-1",
                                   SM_EC2_ENDPOINT=f"http://{moto[0]}:{moto[1]}")

    providers = build_providers(settings)

    assert providers["ec2"].list_instances("c1") == []


@pytest.mark.parametrize("env, error", [
    ({"SM_EC2_CREDENTIALS": "instance-role", "SM_EC2_ACCESS_KEY": "AKID"}, "takes no SM_EC2_ACCESS_KEY"),
    ({"SM_EC2_ACCESS_KEY": "AKID"}, "set both"),
    ({"SM_GCE_PROJECT": GCE_PROJECT, "SM_GCE_AUTH": "metadata", "SM_GCE_KEY_FILE": "/k.json"}, "takes no SM_GCE_KEY"),
    ({"SM_GCE_PROJECT": GCE_PROJECT}, "SM_GCE_KEY_FILE"),
    ({"SM_GCE_PROJECT": GCE_PROJECT, "SM_GCE_AUTH": "metadata", "SM_GCE_METADATA_URL": "metadata"}, "http"),
])
def test_contradictory_or_incomplete_cloud_settings_are_refused_at_start(tmp_path, env, error):
    with pytest.raises(ProviderError, match=error):
        build_providers(controller_settings(tmp_path, **env))


def test_without_cloud_settings_only_the_local_provider_exists(tmp_path):
    assert set(build_providers(controller_settings(tmp_path))) == {"local"}


def test_gce_metadata_settings_make_a_gce_provider_that_authenticates_as_the_vm(tmp_path, gce_api):
    gce_api.reset()
    settings = controller_settings(tmp_path, SM_GCE_PROJECT=GCE_PROJECT, SM_GCE_AUTH="metadata",
                                   SM_GCE_SERVICE_ACCOUNT=GCE_VM_ACCOUNT, SM_GCE_METADATA_URL=metadata_url(gce_api),
                                   SM_GCE_ENDPOINT=f"http://{gce_api.host}:{gce_api.port}")

    providers = build_providers(settings)

    assert providers["gce"].list_instances("c1") == []
    assert ("GET", f"/computeMetadata/v1/instance/service-accounts/{GCE_VM_ACCOUNT}/token") in gce_api.requests


def test_gce_a_key_the_token_endpoint_refuses_becomes_provider_error_without_the_key(gce_api):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    provider = GceProvider(GCE_ACCOUNT, other_key, GCE_PROJECT, endpoint=(gce_api.host, gce_api.port, False))

    with pytest.raises(ProviderError, match="Signature") as raised:
        provider.list_instances("c1")

    assert "PRIVATE KEY" not in str(raised.value)


def test_the_default_boot_script_starts_a_node_agent_with_its_group_region_role_and_zookeeper():
    script = render_boot_script(DEFAULT_BOOT_SCRIPT, package="streammanager==0.1.0",
                                zk_hosts="10.0.0.5:2181,10.0.0.6:2181", zk_root="/sm", zk_auth="sm:pw+0123456789/ab=",
                                role="edge", region="eu-west-1", group="g1", capacity=300, media="nginx",
                                node_id="g1-eu-west-1-edge-abc123", cluster_id="c1")
    assert "pip install -q 'streammanager==0.1.0'" in script
    assert "Environment=AGENT_ZK_HOSTS=10.0.0.5:2181,10.0.0.6:2181" in script
    assert "Environment=AGENT_ZK_ROOT=/sm" in script
    assert "Environment=AGENT_ZK_AUTH=sm:pw+0123456789/ab=" in script  # the cluster's ZooKeeper identity
    unit = script.replace("\\\n  ", "")  # the shell joins continued lines
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert ("--role edge --region eu-west-1 --group g1 --capacity 300 --media nginx "
            "--node-id g1-eu-west-1-edge-abc123") in start
    assert "$(hostname -I" in start  # the address is the VM's own, found at boot
    with pytest.raises(KeyError):  # a template naming an unknown variable is refused, not half-filled
        render_boot_script("${nope}", **{})


@pytest.mark.parametrize("unlistable", [False, True], ids=["every-region-listed", "another-region-unlistable"])
def test_a_booting_ec2_instance_terminated_outside_the_controller_is_replaced_before_its_boot_timeout(
        ec2, moto, zk, zk_root, monkeypatch, unlistable):
    # it was waited for until its boot timeout (5 minutes by default): the sweep's listing shows it gone
    from streammanager import controller as controller_module
    from streammanager.config import ControllerSettings
    from streammanager.controller import Controller
    from streammanager.groups import STARTING, NodeGroup
    from streammanager.registry import ZkPaths, ensure_layout, now_ms
    from streammanager.scaling_store import GroupStore, read_instances
    from tests.conftest import wait_until
    from tests.test_controller import group_doc

    monkeypatch.setattr(controller_module, "VANISHED_AFTER_S", 0.0)
    if unlistable:  # one region failing its listing skipped the sweep of every region
        ec2.know_regions([UNLISTABLE_REGION])
    paths = ZkPaths(zk_root)
    ensure_layout(zk, paths)
    controller = Controller(ControllerSettings(zk_hosts="unused", zk_root=zk_root, cluster_id="c1", controller_id="c1"),
                            {"ec2": ec2}, client=zk)
    doc = group_doc("b1", region="eu-west-1", edge=(1, 2, 1), bootTimeoutS=300)
    doc["launchConfig"].update(provider="ec2", image=AMI, size="t3.micro")
    GroupStore(zk, paths).create(NodeGroup.from_api(doc))
    controller.view.start()
    controller.view.wait_initialized(10)
    controller.instances.start()
    records = lambda: [r for r, _ in read_instances(zk, paths).values()]  # noqa: E731
    try:
        controller.run_once(now_ms())
        wait_until(lambda: [r.state for r in records()] == [STARTING], 10, what="the instance booting")
        booting = records()[0]
        boto3_ec2(moto, "eu-west-1").terminate_instances(InstanceIds=[booting.provider_id.rpartition("/")[2]])
        controller._last_sweep = 0.0  # the next step sweeps
        controller.run_once(now_ms())
        wait_until(lambda: next(r for r in records() if r.id == booting.id).failure == "instance vanished", 10,
                   what="the vanished instance failed")
        controller.run_once(now_ms())  # and replaced
        wait_until(lambda: any(r.id != booting.id and r.state == STARTING for r in records()), 10,
                   what="a replacement launched")
    finally:
        controller._actions.close()
        controller.instances.close()
        controller.view.close()


def test_a_local_agent_gets_none_of_the_controllers_secrets_but_its_own_settings(tmp_path, monkeypatch):
    from streammanager.cloud.local import LocalNodeDriver, LocalProvider

    secrets_of_the_controller = {"SM_EC2_SECRET_KEY": "ec2-secret", "SM_ACCESS_TOKEN": "admin-token",
                                 "AWS_SECRET_ACCESS_KEY": "aws-secret", "EVENT_CALLBACK_AUTH_TOKEN": "app-token"}
    for name, value in {**secrets_of_the_controller, "KEY_VERIFICATION_URL": "http://127.0.0.1:9/verify",
                        "SM_MEDIA_ROOT": str(tmp_path / "media")}.items():
        monkeypatch.setenv(name, value)
    provider = LocalProvider(LocalNodeDriver(tmp_path / "local", f"127.0.0.1:{free_port()}", "/env-test",
                                             pool="127.0.1.230-127.0.1.232", http_port=free_port()))
    instance = provider.launch(dataclasses.replace(launch_request("edge-env", "c1", "us-east-1", "", ""),
                                                   media="none"))
    try:
        raw = (Path("/proc") / str(instance.extra["pid"]) / "environ").read_bytes()
        environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    finally:
        provider.destroy(instance.id, "c1")
    assert not set(secrets_of_the_controller) & set(environ)
    assert environ["KEY_VERIFICATION_URL"] == "http://127.0.0.1:9/verify"  # what agents are configured with
    assert environ["SM_MEDIA_ROOT"] == str(tmp_path / "media") and environ["AGENT_ZK_ROOT"] == "/env-test"
