"""The ``gce`` provider: labelled Compute Engine instances through libcloud's GCE driver.

Instances carry the cluster id, group, region and role as labels, set at creation, and get the boot
script as their ``startup-script`` metadata. An instance lives in zone ``<region><zone_suffix>``
(``us-central1`` + ``-a``) unless ``zones`` names another. ``Instance.id`` is the instance's name,
which is how the Compute API addresses an instance (with its zone, which ``destroy`` finds through the
aggregated instance list); the numeric GCE id is in ``Instance.extra["gce_id"]``.

Authentication is a service account (libcloud's ``SA`` mode): its e-mail and private key (PEM text, a
PEM file, or the JSON key file, path or parsed). libcloud signs a JWT with the key and trades it for an
access token at Google's token endpoint. The token is kept in memory only (libcloud would otherwise
cache it in ``~/.google_libcloud_auth.<project>``) unless ``credential_file`` names a cache file.

``endpoint`` (host, port, secure) sends every request, the API's and the token's, to another server,
e.g. the local fake of the Compute API the tests use: see :class:`EndpointGCENodeDriver`.

Not thread-safe: one controller loop owns a provider.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import requests
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.google import ResourceNotFoundError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node
from libcloud.compute.drivers.gce import GCEConnection, GCENodeDriver
from libcloud.compute.providers import DRIVERS, get_driver, set_driver
from libcloud.compute.types import NodeState

from streammanager.cloud.base import (LABEL_VALUE, TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE, CloudProvider,
                                      Instance, LaunchRequest, ProviderError)

log = logging.getLogger(__name__)

GCE_DRIVER = "streammanager_gce"  # our libcloud provider name for EndpointGCENodeDriver
COMPUTE_API = "https://www.googleapis.com/compute/v1"
STARTUP_SCRIPT_KEY = "startup-script"


class EndpointGCEConnection(GCEConnection):
    """libcloud's GCE connection, optionally aimed at another host (``api_host``).

    libcloud's driver cannot take a host: ``BaseDriver`` would pass it positionally where
    ``GCEConnection`` expects ``auth_type``. So the host travels as ``api_host`` and becomes the
    ``host`` keyword here; with ``port`` and ``secure`` it reaches both this connection and the OAuth
    connection libcloud builds inside it (both get the same keywords). Links in answers
    (``https://www.googleapis.com/...``) are reduced to their path by libcloud, so they follow too.
    """

    def __init__(self, user_id, key, secure, *args, api_host: str | None = None, **kwargs):
        if api_host is not None:
            kwargs["host"] = api_host
        super().__init__(user_id, key, secure, *args, **kwargs)


class EndpointGCENodeDriver(GCENodeDriver):
    """libcloud's GCE driver with an optional ``api_host``/``api_port`` (and ``secure``) override."""

    connectionCls = EndpointGCEConnection
    name = "Google Compute Engine (streammanager)"

    def __init__(self, user_id, key=None, *args, api_host: str | None = None, api_port: int | None = None,
                 **kwargs):
        self._api_host = api_host
        self._api_port = api_port
        super().__init__(user_id, key, *args, **kwargs)

    def _ex_connection_class_kwargs(self):
        kwargs = super()._ex_connection_class_kwargs()
        if self._api_host is not None:
            kwargs["api_host"] = self._api_host
        if self._api_port is not None:
            kwargs["port"] = self._api_port
        return kwargs


def register_driver() -> None:
    """Make ``get_driver(GCE_DRIVER)`` return :class:`EndpointGCENodeDriver` (idempotent)."""
    if GCE_DRIVER not in DRIVERS:
        set_driver(GCE_DRIVER, __name__, EndpointGCENodeDriver.__name__)


register_driver()

_CLOUD_ERRORS = (LibcloudError, BaseHTTPError, requests.RequestException, OSError)


def image_link(image: str) -> str:
    """What the driver should look up for ``image``: a full link as is, ``projects/P/global/images/...``
    (an image or ``family/F``) as a full link, a bare name as is (libcloud then searches the project and
    its list of public image projects)."""
    if image.startswith("projects/"):
        return f"{COMPUTE_API}/{image}"
    return image


class GceProvider(CloudProvider):
    """Compute Engine instances of one project, in any zone.

    ``zones`` names the zone of a region where the suffix does not fit (``europe-west1`` has no zone
    ``-a``).
    """

    name = "gce"

    def __init__(self, service_account: str, private_key: str | dict, project: str, *,
                 zone_suffix: str = "-a", zones: Mapping[str, str] | None = None,
                 endpoint: tuple[str, int, bool] | None = None,
                 network: str = "default", disk_type: str = "pd-standard", credential_file: str | None = None,
                 timeout_s: float = 30.0):
        if not service_account or not private_key or not project:
            raise ValueError("gce provider needs a service account e-mail, its private key and a project")
        self._service_account = service_account
        self._private_key = private_key
        self._project = project
        self._zone_suffix = zone_suffix
        self._zones = dict(zones or {})
        self._endpoint = endpoint
        self._network = network
        self._disk_type = disk_type
        # os.devnull: libcloud reads no cached token from it and writes its token nowhere
        self._credential_file = credential_file or os.devnull
        self._timeout_s = timeout_s
        self._gce: GCENodeDriver | None = None

    def __repr__(self) -> str:  # never the key
        return (f"GceProvider(service_account={self._service_account!r}, project={self._project!r}, "
                f"endpoint={self._endpoint!r})")

    def zone_of(self, region: str) -> str:
        """The zone instances of ``region`` go to: ``zones[region]``, else region + zone suffix."""
        return self._zones.get(region) or f"{region}{self._zone_suffix}"

    # -- CloudProvider -----------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        labels = request.tags()
        bad = {key: value for key, value in labels.items() if not LABEL_VALUE.match(value)}
        if bad:
            raise ProviderError(f"gce launch of {request.name}: label values must be at most 63 lowercase "
                                f"letters, digits, '-' or '_': {bad}")
        zone_name = self.zone_of(request.region)
        driver = self._driver()
        zone = self._call("launch", zone_name, driver.ex_get_zone, zone_name)
        if zone is None:
            raise ProviderError(f"gce launch of {request.name}: no zone {zone_name} in project {self._project}")
        node = self._call("launch", zone_name, driver.create_node, name=request.name, size=request.size,
                          image=image_link(request.image), location=zone, ex_network=self._network,
                          ex_disk_type=self._disk_type, ex_labels=labels,
                          ex_metadata={STARTUP_SCRIPT_KEY: request.boot_script})
        log.info("launched instance", extra={"node_id": request.name, "region": request.region,
                                             "role": request.role, "action": "launch"})
        return _to_instance(node)

    def list_instances(self, cluster_id: str) -> list[Instance]:
        driver = self._driver()
        nodes = self._call("list", "all zones", driver.list_nodes)
        # the driver's list takes no label filter: filter here
        return [_to_instance(node) for node in nodes
                if (node.extra.get("labels") or {}).get(TAG_CLUSTER) == cluster_id
                and node.state != NodeState.TERMINATED]

    def destroy(self, instance_id: str, cluster_id: str) -> bool:
        driver = self._driver()
        node = self._call("describe", "all zones", driver.ex_get_node, instance_id, missing_ok=True)
        if node is None:
            return False
        zone = node.extra["zone"].name
        owner = (node.extra.get("labels") or {}).get(TAG_CLUSTER)
        if owner != cluster_id:
            raise ProviderError(f"gce refuses to destroy {instance_id} in {zone}: it belongs to cluster "
                                f"{owner!r}, not {cluster_id!r}")
        done = self._call("destroy", zone, driver.destroy_node, node, missing_ok=True)
        if done is None:  # deleted by someone else in between
            return False
        log.info("destroyed instance", extra={"node_id": instance_id, "region": zone, "action": "destroy"})
        return True

    def close(self) -> None:
        self._gce = None

    # -- helpers -----------------------------------------------------------------------------------

    def _driver(self) -> GCENodeDriver:
        """The driver, built on first use (building it fetches an access token)."""
        if self._gce is None:
            kwargs: dict[str, Any] = {"project": self._project, "auth_type": "SA",
                                      "credential_file": self._credential_file, "timeout": self._timeout_s}
            if self._endpoint is not None:
                host, port, secure = self._endpoint
                kwargs.update(api_host=host, api_port=port, secure=secure)
            self._gce = self._call("authenticate", self._project, get_driver(GCE_DRIVER), self._service_account,
                                   self._private_key, **kwargs)
        return self._gce

    def _call(self, action: str, where: str, fn, *args, missing_ok: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResourceNotFoundError as exc:
            if missing_ok:
                return None
            error = exc
        except _CLOUD_ERRORS as exc:
            error = exc
        message = self._describe(error)
        log.warning("gce call failed: %s", message, extra={"region": where, "action": action})
        raise ProviderError(f"gce {action} in {where} failed: {message}") from None

    def _describe(self, exc: BaseException) -> str:
        """A readable message for a libcloud error, without the private key."""
        value = getattr(exc, "value", None)
        if isinstance(value, dict) and "message" in value:  # GCE's error item, as libcloud hands it over
            text = f"{value['reason']}: {value['message']}" if value.get("reason") else str(value["message"])
        else:
            text = str(value if value is not None else exc) or type(exc).__name__
        if isinstance(self._private_key, str) and len(self._private_key) > 16:
            text = text.replace(self._private_key, "***")
        return text


def _to_instance(node: Node) -> Instance:
    labels = node.extra.get("labels") or {}
    zone = node.extra["zone"].name if node.extra.get("zone") is not None else ""
    address = (node.public_ips or node.private_ips or [None])[0]
    return Instance(
        id=node.name, name=node.name, state=str(node.state), cluster_id=labels.get(TAG_CLUSTER, ""),
        group=labels.get(TAG_GROUP, ""), region=labels.get(TAG_REGION, zone.rsplit("-", 1)[0]),
        role=labels.get(TAG_ROLE, ""), address=address,
        extra={"zone": zone, "gce_id": node.id, "status": node.extra.get("status"), "machine_type": node.size,
               "private_ip": (node.private_ips or [None])[0]},
    )


__all__ = ["GCE_DRIVER", "EndpointGCENodeDriver", "GceProvider", "image_link", "register_driver"]
