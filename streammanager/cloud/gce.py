"""The ``gce`` provider: labelled Compute Engine instances through libcloud's GCE driver.

Instances carry the cluster id, group, region and role as labels, set at creation, and get the boot
script as their ``startup-script`` metadata. An instance lives in zone ``<region><zone_suffix>``
(``us-central1`` + ``-a``) unless ``zones`` names another. ``Instance.id`` is the instance's name,
which is how the Compute API addresses an instance (with its zone, which ``destroy`` finds through the
aggregated instance list); the numeric GCE id is in ``Instance.extra["gce_id"]``.

Authentication is one of two:

- a service account key (libcloud's ``SA`` mode): its e-mail and private key (PEM text, a PEM file, or
  the JSON key file, path or parsed). libcloud signs a JWT with the key and trades it for an access
  token at Google's token endpoint. The token is kept in memory only (libcloud would otherwise cache it
  in ``~/.google_libcloud_auth.<project>``) unless ``credential_file`` names a cache file.
- the VM's own service account (what libcloud calls ``GCE`` auth): access tokens from the metadata
  server, no key anywhere (:class:`MetadataServerToken`, refreshed ahead of expiry). The server's
  address is a parameter (libcloud's own ``GCE`` mode can only ask ``metadata.google.internal``).

A launch places the instance as its request's ``placement`` says (network, subnetwork, the service
account the instance runs as with its scopes, an external address); without one, the provider's
``network`` and the project's default service account are used.

``endpoint`` (host, port, secure) sends every request, the API's and the token's, to another server,
e.g. the local fake of the Compute API the tests use: see :class:`EndpointGCENodeDriver`.

Not thread-safe: one controller loop owns a provider.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Callable
from urllib.parse import quote

import requests
from libcloud.common.base import ConnectionUserAndKey
from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.google import GoogleAuthError, ResourceNotFoundError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node
from libcloud.compute.drivers.gce import API_VERSION, GCEConnection, GCENodeDriver, GCESubnetwork
from libcloud.compute.providers import DRIVERS, get_driver, set_driver
from libcloud.compute.types import NodeState

from streammanager.cloud.base import (DEFAULT_GCE_SCOPES, LABEL_VALUE, TAG_CLUSTER, TAG_GROUP, TAG_REGION, TAG_ROLE,
                                      CloudProvider, Instance, LaunchRequest, ProviderError, is_unconfirmed,
                                      is_unreachable)

log = logging.getLogger(__name__)

GCE_DRIVER = "streammanager_gce"  # our libcloud provider name for EndpointGCENodeDriver
COMPUTE_API = "https://www.googleapis.com/compute/v1"
METADATA_URL = "http://metadata.google.internal/computeMetadata/v1"
STARTUP_SCRIPT_KEY = "startup-script"


class MetadataServerToken:
    """Access tokens of this VM's service account, from the GCE metadata server.

    It stands in for libcloud's ``GoogleOAuth2Credential`` (the connection reads ``access_token`` before
    every request) and does what libcloud's ``GCE`` auth does, with the server's address as a parameter:
    ``GET <metadata_url>/instance/service-accounts/<account>/token`` with ``Metadata-Flavor: Google``.
    A token is fetched on first use and again ``refresh_margin_s`` before it expires (the metadata server
    hands out a new one when the cached one has under five minutes left). Failures raise
    ``GoogleAuthError`` (a ``LibcloudError``).
    """

    def __init__(self, metadata_url: str = METADATA_URL, account: str = "default", timeout_s: float = 5.0,
                 refresh_margin_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._url = f"{metadata_url.rstrip('/')}/instance/service-accounts/{quote(account, safe='@.')}/token"
        self._timeout_s = timeout_s
        self._refresh_margin_s = refresh_margin_s
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._http = requests.Session()
        self._http.trust_env = False  # the metadata server is link-local: never through an HTTP(S)_PROXY

    @property
    def access_token(self) -> str:
        if self._token is None or self._clock() >= self._expires_at - self._refresh_margin_s:
            self._fetch()
        return self._token

    def _fetch(self) -> None:
        try:
            response = self._http.get(self._url, headers={"Metadata-Flavor": "Google"}, timeout=self._timeout_s)
        except requests.RequestException as exc:
            raise GoogleAuthError(f"the metadata server did not answer ({self._url}): {exc}") from None
        if response.status_code != 200:
            raise GoogleAuthError(f"the metadata server refused a token ({self._url}): HTTP "
                                  f"{response.status_code} {response.text[:200]}")
        try:
            body = response.json()
            token, lifetime_s = str(body["access_token"]), float(body.get("expires_in", 0))
        except (ValueError, KeyError, TypeError):
            raise GoogleAuthError(f"the metadata server's token answer is not readable ({self._url})") from None
        self._token = token
        self._expires_at = self._clock() + lifetime_s


class EndpointGCEConnection(GCEConnection):
    """libcloud's GCE connection, optionally aimed at another host (``api_host``), optionally
    authenticated by a :class:`MetadataServerToken` (``metadata_token``).

    libcloud's driver cannot take a host: ``BaseDriver`` would pass it positionally where
    ``GCEConnection`` expects ``auth_type``. So the host travels as ``api_host`` and becomes the
    ``host`` keyword here; with ``port`` and ``secure`` it reaches both this connection and the OAuth
    connection libcloud builds inside it (both get the same keywords). Links in answers
    (``https://www.googleapis.com/...``) are reduced to their path by libcloud, so they follow too.

    With ``metadata_token`` the connection builds no libcloud credential (whose ``GCE`` mode would ask
    ``metadata.google.internal`` at once): it sets up what ``GCEConnection`` and its base would, and takes
    its bearer token from ``metadata_token``.
    """

    def __init__(self, user_id, key, secure, *args, api_host: str | None = None,
                 metadata_token: MetadataServerToken | None = None, **kwargs):
        if api_host is not None:
            kwargs["host"] = api_host
        if metadata_token is None:
            super().__init__(user_id, key, secure, *args, **kwargs)
            return
        project = kwargs.pop("project")
        for credential_option in ("auth_type", "credential_file", "scopes"):
            kwargs.pop(credential_option, None)
        ConnectionUserAndKey.__init__(self, user_id, key, secure, *args, **kwargs)
        self.oauth2_credential = metadata_token
        self.request_path = f"/compute/{API_VERSION}/projects/{project}"
        self.gce_params = None


class EndpointGCENodeDriver(GCENodeDriver):
    """libcloud's GCE driver with an optional ``api_host``/``api_port`` (and ``secure``) override and an
    optional ``metadata_token`` (the VM's own service account) instead of libcloud's credentials."""

    connectionCls = EndpointGCEConnection
    name = "Google Compute Engine (streammanager)"

    def __init__(self, user_id, key=None, *args, api_host: str | None = None, api_port: int | None = None,
                 metadata_token: MetadataServerToken | None = None, **kwargs):
        self._api_host = api_host
        self._api_port = api_port
        self._metadata_token = metadata_token
        super().__init__(user_id, key, *args, **kwargs)

    def _ex_connection_class_kwargs(self):
        kwargs = super()._ex_connection_class_kwargs()
        if self._api_host is not None:
            kwargs["api_host"] = self._api_host
        if self._api_port is not None:
            kwargs["port"] = self._api_port
        if self._metadata_token is not None:
            kwargs["metadata_token"] = self._metadata_token
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


def network_link(network: str) -> str:
    """What the driver should look up for a network: ``projects/P/global/networks/N`` as a full link, a
    full link or a bare name (of the provider's project) as is."""
    return f"{COMPUTE_API}/{network}" if network.startswith("projects/") else network


def subnetwork_link(subnetwork: str, project: str, region: str) -> str:
    """The full link of a subnetwork: a bare name is one of ``project`` in ``region``."""
    if subnetwork.startswith("https://"):
        return subnetwork
    if subnetwork.startswith("projects/"):
        return f"{COMPUTE_API}/{subnetwork}"
    return f"{COMPUTE_API}/projects/{project}/regions/{region}/subnetworks/{subnetwork}"


class GceProvider(CloudProvider):
    """Compute Engine instances of one project, in any zone.

    With a ``private_key`` the provider authenticates as ``service_account`` with that key; with
    ``private_key=None`` (see :meth:`with_metadata_auth`) it uses the VM's own service account through
    the metadata server at ``metadata_url`` (``service_account`` then names which of the VM's accounts:
    ``default`` unless given). ``zones`` names the zone of a region where the suffix does not fit
    (``europe-west1`` has no zone ``-a``).
    """

    name = "gce"

    def __init__(self, service_account: str | None, private_key: str | dict | None, project: str, *,
                 zone_suffix: str = "-a", zones: Mapping[str, str] | None = None,
                 endpoint: tuple[str, int, bool] | None = None,
                 network: str = "default", disk_type: str = "pd-standard", credential_file: str | None = None,
                 metadata_url: str = METADATA_URL, timeout_s: float = 30.0):
        if not project:
            raise ValueError("gce provider needs a project")
        if private_key is not None and (not service_account or not private_key):
            raise ValueError("gce provider needs a service account e-mail and its private key (or no key: "
                             "the metadata server)")
        self._service_account = service_account or "default"
        self._private_key = private_key
        self._metadata_url = metadata_url
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

    @classmethod
    def with_metadata_auth(cls, project: str, *, service_account: str | None = None,
                           metadata_url: str = METADATA_URL, **options: Any) -> "GceProvider":
        """A provider that authenticates as the VM it runs on (no key): tokens from the metadata server."""
        return cls(service_account, None, project, metadata_url=metadata_url, **options)

    def __repr__(self) -> str:  # never the key
        auth = "metadata server" if self._private_key is None else "key"
        return (f"GceProvider(service_account={self._service_account!r}, auth={auth!r}, project={self._project!r}, "
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
                          image=image_link(request.image), location=zone, ex_disk_type=self._disk_type,
                          ex_labels=labels, ex_metadata={STARTUP_SCRIPT_KEY: request.boot_script},
                          **self._placement_arguments(request, driver))
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

    def _placement_arguments(self, request: LaunchRequest, driver: GCENodeDriver) -> dict[str, Any]:
        """``create_node`` keywords for the request's placement (see ``GCE_PLACEMENT_FIELDS``)."""
        placement = request.placement or {}
        kwargs: dict[str, Any] = {"ex_network": network_link(placement.get("network") or self._network),
                                  "external_ip": "ephemeral" if placement.get("publicIp", True) else None}
        if placement.get("subnetwork"):
            link = subnetwork_link(placement["subnetwork"], self._project, request.region)
            # given as an object with its link, libcloud looks nothing up (its own look-up lists every
            # region first); the Compute API checks the subnetwork when it creates the instance
            kwargs["ex_subnetwork"] = GCESubnetwork(id=None, name=link.rsplit("/", 1)[-1], cidr=None, network=None,
                                                    region=None, driver=driver, extra={"selfLink": link})
        if placement.get("serviceAccount"):
            scopes = list(placement.get("scopes") or DEFAULT_GCE_SCOPES)
            kwargs["ex_service_accounts"] = [{"email": placement["serviceAccount"], "scopes": scopes}]
        return kwargs

    def _driver(self) -> GCENodeDriver:
        """The driver, built on first use (building it fetches an access token)."""
        if self._gce is None:
            kwargs: dict[str, Any] = {"project": self._project, "credential_file": self._credential_file,
                                      "timeout": self._timeout_s}
            if self._endpoint is not None:
                host, port, secure = self._endpoint
                kwargs.update(api_host=host, api_port=port, secure=secure)
            if self._private_key is None:
                token = MetadataServerToken(self._metadata_url, self._service_account,
                                            timeout_s=min(self._timeout_s, 10.0))
                # fetched now, so that a VM without a usable service account fails here, like a bad key
                self._call("authenticate", self._project, lambda: token.access_token)
                # key "": libcloud passes the key positionally only when it is not None
                self._gce = self._call("authenticate", self._project, get_driver(GCE_DRIVER), self._service_account,
                                       "", auth_type="GCE", metadata_token=token, **kwargs)
            else:
                self._gce = self._call("authenticate", self._project, get_driver(GCE_DRIVER), self._service_account,
                                       self._private_key, auth_type="SA", **kwargs)
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
        raise ProviderError(f"gce {action} in {where} failed: {message}", unconfirmed=is_unconfirmed(error),
                            unreachable=is_unreachable(error)) from None

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
               "private_ip": (node.private_ips or [None])[0],
               "service_accounts": [account.get("email") for account in node.extra.get("serviceAccounts") or []],
               # the sweep leaves an untracked instance this young alone (a launch being recorded)
               "created_ms": _epoch_ms(node.extra.get("creationTimestamp"))},
    )


__all__ = ["GCE_DRIVER", "METADATA_URL", "EndpointGCENodeDriver", "GceProvider", "MetadataServerToken", "image_link",
           "network_link", "register_driver", "subnetwork_link"]


def _epoch_ms(timestamp: str | None) -> int:
    """GCE's RFC 3339 ``creationTimestamp`` in epoch ms (0 when missing or unreadable)."""
    try:
        return int(datetime.fromisoformat(timestamp).timestamp() * 1000) if timestamp else 0
    except ValueError:
        return 0
