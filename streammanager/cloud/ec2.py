"""The ``ec2`` provider: tagged EC2 instances through libcloud's EC2 driver, one driver per region.

A node group on AWS is a set of instances carrying our tags (the EC2 driver has no Auto Scaling Group
API). Instances are tagged at creation (``TagSpecification``), so an instance never exists untagged.
``list_instances`` asks EC2 for this cluster's tag only; ``destroy`` looks the instance up first and
refuses one whose cluster tag differs.

The driver is libcloud's ``EC2NodeDriver`` with two small compatibility changes so that the same class
works against AWS and against a local ``moto_server`` (see :class:`CompatEC2NodeDriver`). It is registered
with libcloud under :data:`EC2_DRIVER` and loaded by that name.

Not thread-safe: one controller loop owns a provider.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import requests
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeSize
from libcloud.compute.drivers.ec2 import NAMESPACE, EC2Connection, EC2NodeDriver, EC2Response
from libcloud.compute.providers import DRIVERS, get_driver, set_driver
from libcloud.compute.types import NodeState

from streammanager.cloud.base import (TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE, CloudProvider, Instance,
                                      LaunchRequest, ProviderError)

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
        super().__init__(key, secret=secret, secure=secure, host=host, port=port, region=region,
                         token=token, signature_version=signature_version, **kwargs)


def register_driver() -> None:
    """Make ``get_driver(EC2_DRIVER)`` return :class:`CompatEC2NodeDriver` (idempotent)."""
    if EC2_DRIVER not in DRIVERS:
        set_driver(EC2_DRIVER, __name__, CompatEC2NodeDriver.__name__)


register_driver()

# libcloud errors, HTTP errors from the API, and the network failing under it
_CLOUD_ERRORS = (LibcloudError, BaseHTTPError, requests.RequestException, OSError)


class Ec2Provider(CloudProvider):
    """EC2 instances of one AWS account, in any region.

    ``region`` is the home region; a launch goes to ``request.region``. ``list_instances`` and a
    ``destroy`` of an instance this process has not seen scan the home region, ``regions`` and every
    region launched into since start: pass the group's regions as ``regions`` so that a restarted
    controller still finds all of its instances. ``endpoint`` (host, port, secure) replaces AWS's regional
    endpoints, e.g. ``("127.0.0.1", 5000, False)`` for a local ``moto_server``.
    """

    name = "ec2"

    def __init__(self, key_id: str, secret: str, region: str,
                 endpoint: tuple[str, int, bool] | None = None, regions: Iterable[str] = (),
                 timeout_s: float = 30.0):
        if not key_id or not secret:
            raise ValueError("ec2 provider needs an access key id and a secret access key")
        self._key_id = key_id
        self._secret = secret
        self._home_region = region
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._regions = list(dict.fromkeys([region, *regions]))
        self._drivers: dict[str, EC2NodeDriver] = {}
        self._region_of: dict[str, str] = {}  # instance id -> region, as seen by launch/list

    def __repr__(self) -> str:  # never the secret
        return f"Ec2Provider(key_id={self._key_id!r}, region={self._home_region!r}, endpoint={self._endpoint!r})"

    # -- CloudProvider -----------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        driver = self._driver(request.region)
        # libcloud passes only the ids of these value objects to RunInstances; EC2 validates them
        image = NodeImage(id=request.image, name=None, driver=driver)
        size = NodeSize(id=request.size, name=request.size, ram=None, disk=None, bandwidth=None, price=None,
                        driver=driver)
        node = self._call("launch", request.region, driver.create_node, name=request.name, image=image,
                          size=size, ex_metadata=request.tags(), ex_userdata=request.boot_script)
        if not isinstance(node, Node):  # libcloud returns [] when it cannot read the answer
            raise ProviderError(f"ec2 launch of {request.name} in {request.region}: no instance in the answer")
        self._region_of[node.id] = request.region
        log.info("launched instance", extra={"node_id": request.name, "region": request.region,
                                             "role": request.role, "action": "launch"})
        return _to_instance(node, request.region)

    def list_instances(self, cluster_id: str) -> list[Instance]:
        filters = {f"tag:{TAG_CLUSTER}": cluster_id, "instance-state-name": LIVE_STATES}
        instances = []
        for region in self._known_regions():
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

    def close(self) -> None:
        self._drivers.clear()

    # -- helpers -----------------------------------------------------------------------------------

    def _driver(self, region: str) -> EC2NodeDriver:
        driver = self._drivers.get(region)
        if driver is None:
            kwargs: dict = {"region": region, "timeout": self._timeout_s}
            if self._endpoint is not None:
                host, port, secure = self._endpoint
                kwargs.update(host=host, port=port, secure=secure)
            try:
                driver = get_driver(EC2_DRIVER)(self._key_id, self._secret, **kwargs)
            except ValueError as exc:  # libcloud: "Invalid region: ..."
                raise ProviderError(f"ec2: {self._scrub(exc)}") from None
            self._drivers[region] = driver
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
            raise ProviderError(f"ec2 {action} in {region} failed: {message}") from None

    def _scrub(self, exc: BaseException) -> str:
        """The error's text without the secret (libcloud error texts carry request details)."""
        text = str(exc) or type(exc).__name__
        return text.replace(self._secret, "***")


def _to_instance(node: Node, region: str) -> Instance:
    tags = node.extra.get("tags", {})
    address = (node.public_ips or node.private_ips or [None])[0]
    state = node.state if node.extra.get("status") not in GONE_STATES else NodeState.TERMINATED
    return Instance(
        id=node.id, name=tags.get("Name", node.name), state=str(state), cluster_id=tags.get(TAG_CLUSTER, ""),
        group=tags.get(TAG_GROUP, ""), region=tags.get(TAG_REGION, region), role=tags.get(TAG_ROLE, ""),
        address=address,
        extra={"provider_region": region, "availability_zone": node.extra.get("availability"),
               "instance_type": node.extra.get("instance_type"), "image_id": node.extra.get("image_id"),
               "private_ip": (node.private_ips or [None])[0], "status": node.extra.get("status")},
    )


__all__ = ["EC2_DRIVER", "CompatEC2NodeDriver", "Ec2Provider", "register_driver"]
