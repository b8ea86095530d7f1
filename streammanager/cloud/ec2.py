"""The ``ec2`` provider: tagged EC2 instances through libcloud's EC2 driver, one driver per region.

A node group on AWS is a set of instances carrying our tags (the EC2 driver has no Auto Scaling Group
API). Instances are tagged at creation (``TagSpecification``), so an instance never exists untagged.
``list_instances`` asks EC2 for this cluster's tag only; ``destroy`` looks the instance up first and
refuses one whose cluster tag differs.

The driver is libcloud's ``EC2NodeDriver`` with two small compatibility changes so that the same class
works against AWS and against a local ``moto_server`` (see :class:`CompatEC2NodeDriver`). It is registered
with libcloud under :data:`EC2_DRIVER` and loaded by that name.

Credentials are static keys (:class:`StaticCredentials`) or AWS's default credential chain
(:class:`DefaultChainCredentials`, botocore's resolver: on an EC2 instance, its role's temporary
credentials through IMDSv2). They are asked for before every use of a driver, and a driver is rebuilt
when they changed, so refreshed temporary credentials (with their session token) take effect at once.

A launch places the instance as its request's ``placement`` says (subnet, security groups, instance
profile, public address); without one, EC2's defaults apply (the default VPC and security group).

Not thread-safe: one controller loop owns a provider.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import requests
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeSize
from libcloud.compute.drivers.ec2 import (NAMESPACE, VALID_EC2_REGIONS, EC2Connection, EC2NetworkSubnet, EC2NodeDriver,
                                          EC2Response)
from libcloud.compute.providers import DRIVERS, get_driver, set_driver
from libcloud.compute.types import NodeState

from streammanager.cloud.base import (TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE, CloudProvider, Instance,
                                      LaunchRequest, Listing, ProviderError, is_unconfirmed,
                                      is_unreachable)

log = logging.getLogger(__name__)

EC2_DRIVER = "streammanager_ec2"  # our libcloud provider name for CompatEC2NodeDriver

# EC2 states after TerminateInstances: the instance is gone (or irrevocably going)
GONE_STATES = ("shutting-down", "terminated")
LIVE_STATES = ["pending", "running", "stopping", "stopped"]

# libcloud parses EC2 answers in the namespace ".../doc/2016-11-15/" (with the trailing slash AWS sends);
# moto answers in ".../doc/2016-11-15" (without it), so every lookup would find nothing
_XMLNS_LIBCLOUD = f'xmlns="{NAMESPACE}"'
_XMLNS_WITHOUT_SLASH = f'xmlns="{NAMESPACE.rstrip("/")}"'


class CompatEC2Response(EC2Response):
    """An EC2 answer whose namespaces are normalised to what libcloud expects; a no-op against AWS.

    Answers: moto's root namespace lacks the trailing '/' AWS sends, without which ``create_node``
    silently returns ``[]`` and ``list_nodes`` nothing. Errors: AWS sends ``<Response>`` without a
    namespace and libcloud looks for ``Errors/Error`` without one; moto puts its namespace on
    ``<Response>``, which would leave every error without its code and message.
    """

    def parse_body(self):
        if isinstance(self.body, str) and _XMLNS_WITHOUT_SLASH in self.body:
            self.body = self.body.replace(_XMLNS_WITHOUT_SLASH, _XMLNS_LIBCLOUD, 1)
        return super().parse_body()

    def parse_error(self):
        if isinstance(self.body, str):
            self.body = self.body.replace(f"<Response {_XMLNS_WITHOUT_SLASH}>", "<Response>", 1)
        return super().parse_error()


class CompatEC2Connection(EC2Connection):
    responseCls = CompatEC2Response


class CompatEC2NodeDriver(EC2NodeDriver):
    """libcloud's EC2 driver, signing with SigV4 by default and parsing moto's namespace.

    SigV4 is what AWS wants in every region today; moto needs it too (with SigV2 moto takes the request
    for S3 and ``create_node`` returns ``[]``), and it routes each request to the region named in the
    signature's scope. ``CreateTags`` (libcloud's ``ex_create_tags`` numbers tags from 0, moto wants
    them from 1) is not needed: tags are given at creation, in ``RunInstances``.
    """

    connectionCls = CompatEC2Connection
    name = "Amazon EC2 (streammanager)"

    def __init__(self, key, secret=None, secure=True, host=None, port=None, region="us-east-1",
                 token=None, signature_version="4", **kwargs):
        # libcloud's table of regions stops at the ones it knew at release (3.9 has no ca-west-1,
        # il-central-1, mx-central-1, ...), and it refuses any other: a group there could never launch,
        # and listing it failed every sweep. A newer region is the same API at its regional endpoint, the
        # signature scoped to the region's name, which is all the driver reads of it.
        known = region in VALID_EC2_REGIONS
        if not known and host is None:
            host = f"ec2.{region}.amazonaws.com"
        super().__init__(key, secret=secret, secure=secure, host=host, port=port,
                         region=region if known else "us-east-1", token=token,
                         signature_version=signature_version, **kwargs)
        if not known:
            self.region_name = region
            self.api_name = "ec2_" + region.replace("-", "_")
            self.country = ""


def register_driver() -> None:
    """Make ``get_driver(EC2_DRIVER)`` return :class:`CompatEC2NodeDriver` (idempotent)."""
    if EC2_DRIVER not in DRIVERS:
        set_driver(EC2_DRIVER, __name__, CompatEC2NodeDriver.__name__)


register_driver()

# libcloud errors, HTTP errors from the API, and the network failing under it
_CLOUD_ERRORS = (LibcloudError, BaseHTTPError, requests.RequestException, OSError)


class AwsCredentials(NamedTuple):
    key_id: str
    secret: str
    token: str | None = None  # the session token of temporary credentials

    def __repr__(self) -> str:  # never the secret nor the token
        return f"AwsCredentials(key_id={self.key_id!r}, temporary={self.token is not None})"


class CredentialSource(Protocol):
    def current(self) -> AwsCredentials:
        """Credentials valid now (refreshed first when they are about to expire); ProviderError when
        there are none."""


class StaticCredentials:
    """An access key id and its secret, as configured."""

    def __init__(self, key_id: str, secret: str):
        if not key_id or not secret:
            raise ValueError("ec2 provider needs an access key id and a secret access key")
        self._credentials = AwsCredentials(key_id, secret)

    def current(self) -> AwsCredentials:
        return self._credentials

    def __repr__(self) -> str:
        return f"StaticCredentials(key_id={self._credentials.key_id!r})"


class DefaultChainCredentials:
    """AWS's default credential chain, resolved by botocore the way the AWS CLI and SDKs do it: the
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` environment variables, the
    shared credentials and config files (profiles, assume-role, SSO), a container role, then the EC2
    instance role through IMDSv2 (``AWS_EC2_METADATA_SERVICE_ENDPOINT`` moves it, e.g. to a local fake).

    Nothing is asked before the first :meth:`current`. Temporary credentials come back as botocore's
    refreshable credentials, which fetch new ones ahead of expiry (an instance role's 15 minutes before);
    :meth:`current` reads them each time, so a caller that asks before every use never signs with expired
    ones. A chain that found nothing is asked again on the next call.
    """

    def __init__(self, session=None):
        self._session = session  # a botocore Session; None: a new one on first use
        self._credentials = None

    def current(self) -> AwsCredentials:
        from botocore.exceptions import BotoCoreError

        try:
            if self._credentials is None:
                if self._session is None:
                    import botocore.session

                    self._session = botocore.session.Session()
                self._credentials = self._session.get_credentials()
            if self._credentials is None:
                raise ProviderError("ec2: AWS's credential chain found no credentials (no instance role, no "
                                    "AWS_* environment variables, no profile)")
            frozen = self._credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise ProviderError(f"ec2: could not obtain AWS credentials: {exc}") from None
        if not frozen.access_key or not frozen.secret_key:
            raise ProviderError("ec2: AWS's credential chain returned incomplete credentials")
        return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)

    def __repr__(self) -> str:
        method = getattr(self._credentials, "method", None)
        return f"DefaultChainCredentials(method={method!r})"


class Ec2Provider(CloudProvider):
    """EC2 instances of one AWS account, in any region.

    ``key_id`` and ``secret`` are a static access key; without them (both None) the provider takes its
    credentials from ``credentials``, by default AWS's credential chain (:class:`DefaultChainCredentials`:
    an instance role on EC2). ``region`` is the home region; a launch goes to ``request.region``.
    ``list_instances`` and a ``destroy`` of an instance this process has not seen scan the home region,
    ``regions`` and every region launched into since start: pass the group's regions as ``regions`` so that
    a restarted controller still finds all of its instances. ``endpoint`` (host, port, secure) replaces
    AWS's regional endpoints, e.g. ``("127.0.0.1", 5000, False)`` for a local ``moto_server``.
    """

    name = "ec2"

    def __init__(self, key_id: str | None, secret: str | None, region: str,
                 endpoint: tuple[str, int, bool] | None = None, regions: Iterable[str] = (),
                 timeout_s: float = 30.0, *, credentials: CredentialSource | None = None):
        if key_id is not None or secret is not None:
            if credentials is not None:
                raise ValueError("ec2 provider: give static keys or a credential source, not both")
            credentials = StaticCredentials(key_id or "", secret or "")
        self._credentials: CredentialSource = credentials or DefaultChainCredentials()
        self._in_use: AwsCredentials | None = None  # what the drivers were last built with
        self._home_region = region
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._regions = list(dict.fromkeys([region, *regions]))
        self._drivers: dict[str, tuple[AwsCredentials, EC2NodeDriver]] = {}
        self._region_of: dict[str, str] = {}  # instance id -> region, as seen by launch/list

    def __repr__(self) -> str:  # never the secret
        return (f"Ec2Provider(credentials={self._credentials!r}, region={self._home_region!r}, "
                f"endpoint={self._endpoint!r})")

    # -- CloudProvider -----------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        driver = self._driver(request.region)
        # libcloud passes only the ids of these value objects to RunInstances; EC2 validates them
        image = NodeImage(id=request.image, name=None, driver=driver)
        size = NodeSize(id=request.size, name=request.size, ram=None, disk=None, bandwidth=None, price=None,
                        driver=driver)
        node = self._call("launch", request.region, driver.create_node, name=request.name, image=image,
                          size=size, ex_metadata=request.tags(), ex_userdata=request.boot_script,
                          **placement_arguments(request))
        if not isinstance(node, Node):  # libcloud returns [] when it cannot read the answer
            raise ProviderError(f"ec2 launch of {request.name} in {request.region}: no instance in the answer")
        self._region_of[node.id] = request.region
        log.info("launched instance", extra={"node_id": request.name, "region": request.region,
                                             "role": request.role, "action": "launch"})
        return _to_instance(node, request.region)

    def list_instances(self, cluster_id: str) -> list[Instance]:
        instances, failed = self._list_regions(cluster_id)
        if failed:  # all or nothing, as callers other than the sweep expect
            raise next(iter(failed.values()))
        return instances

    def listing(self, cluster_id: str) -> Listing:
        """Region by region: one region that fails its listing (an outage there, a region the account
        has not opted into) used to fail the whole sweep, so that strays, lost confirmations and vanished
        instances were dealt with in no region at all."""
        instances, failed = self._list_regions(cluster_id)
        if failed and len(failed) == len(self._known_regions()):
            raise next(iter(failed.values()))
        return Listing(instances, {region: str(exc) for region, exc in failed.items()})

    def _list_regions(self, cluster_id: str) -> tuple[list[Instance], dict[str, ProviderError]]:
        instances: list[Instance] = []
        failed: dict[str, ProviderError] = {}
        for region in self._known_regions():
            try:
                instances.extend(self._list_region(region, cluster_id))
            except ProviderError as exc:
                failed[region] = exc
        return instances, failed

    def _list_region(self, region: str, cluster_id: str) -> list[Instance]:
        filters = {f"tag:{TAG_CLUSTER}": cluster_id, "instance-state-name": LIVE_STATES}
        instances = []
        driver = self._driver(region)
        for node in self._call("list", region, driver.list_nodes, ex_filters=filters):
            # the filter already did this; the check keeps "never touch what is not ours" local
            if node.extra.get("tags", {}).get(TAG_CLUSTER) != cluster_id:
                continue
            if node.extra.get("status") in GONE_STATES:
                continue
            self._region_of[node.id] = region
            instances.append(_to_instance(node, region))
        return instances

    def destroy(self, instance_id: str, cluster_id: str) -> bool:
        """``instance_id`` is ``region/i-...`` as :meth:`launch` and :meth:`list_instances` answer it (a
        bare ``i-...`` is looked for in every known region)."""
        region_hint, _, instance_id = instance_id.rpartition("/")
        if region_hint:
            self._region_of.setdefault(instance_id, region_hint)
        found = self._find(instance_id)
        if found is None:
            return False
        region, node = found
        owner = node.extra.get("tags", {}).get(TAG_CLUSTER)
        if owner != cluster_id:
            raise ProviderError(f"ec2 refuses to destroy {instance_id} in {region}: it belongs to cluster "
                                f"{owner!r}, not {cluster_id!r}")
        if node.extra.get("status") in GONE_STATES:
            return False
        self._call("destroy", region, self._driver(region).destroy_node, node)
        log.info("destroyed instance", extra={"node_id": node.name, "region": region, "action": "destroy"})
        return True

    def know_regions(self, regions) -> None:
        for region in regions:
            if region not in self._regions:
                self._regions.append(region)

    def close(self) -> None:
        self._drivers.clear()

    # -- helpers -----------------------------------------------------------------------------------

    def _driver(self, region: str) -> EC2NodeDriver:
        """The region's driver, signing with the credentials valid now (rebuilt when they changed)."""
        credentials = self._credentials.current()
        if credentials != self._in_use:
            if self._in_use is not None:
                log.info("ec2 credentials were refreshed: new drivers", extra={"action": "credentials"})
            self._in_use = credentials
        cached = self._drivers.get(region)
        if cached is not None and cached[0] == credentials:
            return cached[1]
        kwargs: dict = {"region": region, "timeout": self._timeout_s, "token": credentials.token}
        if self._endpoint is not None:
            host, port, secure = self._endpoint
            kwargs.update(host=host, port=port, secure=secure)
        try:
            driver = get_driver(EC2_DRIVER)(credentials.key_id, credentials.secret, **kwargs)
        except ValueError as exc:  # libcloud: "Invalid region: ..."
            raise ProviderError(f"ec2: {self._scrub(exc)}") from None
        self._drivers[region] = (credentials, driver)
        if region not in self._regions:
            self._regions.append(region)
        return driver

    def _known_regions(self) -> list[str]:
        return list(self._regions)

    def _find(self, instance_id: str) -> tuple[str, Node] | None:
        """(region, node) of an instance, or None when no known region has it (any more)."""
        hint = self._region_of.get(instance_id)
        regions = [hint] if hint else []
        regions += [r for r in self._known_regions() if r != hint]
        for region in regions:
            driver = self._driver(region)
            # a filter, not InstanceId: an unknown id is then an empty answer rather than an error
            nodes = self._call("describe", region, driver.list_nodes, ex_filters={"instance-id": instance_id})
            for node in nodes:
                if node.id == instance_id:
                    return region, node
        self._region_of.pop(instance_id, None)
        return None

    def _call(self, action: str, region: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _CLOUD_ERRORS as exc:
            message = self._scrub(exc)
            log.warning("ec2 call failed: %s", message, extra={"region": region, "action": action})
            raise ProviderError(f"ec2 {action} in {region} failed: {message}",
                                unconfirmed=is_unconfirmed(exc),
                                unreachable=is_unreachable(exc)) from None

    def _scrub(self, exc: BaseException) -> str:
        """The error's text without the secret or the session token (libcloud error texts carry request
        details)."""
        text = str(exc) or type(exc).__name__
        if self._in_use is not None:
            for hidden in (self._in_use.secret, self._in_use.token):
                if hidden:
                    text = text.replace(hidden, "***")
        return text


def placement_arguments(request: LaunchRequest) -> dict:
    """``create_node`` keywords for the request's placement (see ``EC2_PLACEMENT_FIELDS``).

    ``subnets``: the instance goes to one of them, chosen by its name (so a pool spreads over the subnets'
    zones); ``securityGroups`` (ids, which EC2 takes only with a subnet); ``instanceProfile`` (name or ARN);
    ``publicIp``: ask for a public IPv4 address (otherwise the subnet's own setting decides).
    """
    placement = request.placement or {}
    kwargs: dict = {}
    subnets = list(placement.get("subnets") or ())
    groups = list(placement.get("securityGroups") or ())
    if subnets:
        subnet_id = subnets[zlib.crc32(request.name.encode()) % len(subnets)]
        kwargs["ex_subnet"] = EC2NetworkSubnet(subnet_id, subnet_id, "available")
    if groups:
        if not subnets:
            raise ProviderError(f"ec2 launch of {request.name}: security groups need a subnet")
        kwargs["ex_security_group_ids"] = groups
    if placement.get("instanceProfile"):
        kwargs["ex_iamprofile"] = placement["instanceProfile"]
    if placement.get("publicIp"):
        kwargs["ex_assign_public_ip"] = True
    return kwargs


def _to_instance(node: Node, region: str) -> Instance:
    tags = node.extra.get("tags", {})
    address = (node.public_ips or node.private_ips or [None])[0]
    state = node.state if node.extra.get("status") not in GONE_STATES else NodeState.TERMINATED
    return Instance(  # the id carries the region: a restarted controller finds the instance without a search
        id=f"{region}/{node.id}", name=tags.get("Name", node.name), state=str(state),
        cluster_id=tags.get(TAG_CLUSTER, ""),
        group=tags.get(TAG_GROUP, ""), region=tags.get(TAG_REGION, region), role=tags.get(TAG_ROLE, ""),
        address=address,
        extra={"provider_region": region, "instance_id": node.id, "availability_zone": node.extra.get("availability"),
               "instance_type": node.extra.get("instance_type"), "image_id": node.extra.get("image_id"),
               "private_ip": (node.private_ips or [None])[0], "status": node.extra.get("status"),
               "subnet_id": node.extra.get("subnet_id"), "vpc_id": node.extra.get("vpc_id"),
               # the sweep leaves an untracked instance this young alone (a launch being recorded)
               "created_ms": int(node.created_at.timestamp() * 1000) if node.created_at else 0},
    )


__all__ = ["EC2_DRIVER", "AwsCredentials", "CompatEC2NodeDriver", "DefaultChainCredentials", "Ec2Provider",
           "StaticCredentials", "placement_arguments", "register_driver"]
