"""What the controller needs from a cloud: launch a tagged instance, list its own, destroy one.

Every provider is a thin adapter over a libcloud ``NodeDriver`` (ours for ``local``, libcloud's for
``ec2`` and ``gce``). Instances carry the cluster id, group, region and role as tags (EC2) or labels
(GCE); ``list_instances`` returns only instances tagged with the given cluster id, and ``destroy``
refuses an instance that does not carry it: the controller never touches what it did not launch.
"""
from __future__ import annotations

import abc
import re
import socket
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# tag / label keys; GCE labels allow only lowercase letters, digits, '-' and '_'
TAG_CLUSTER = "sm-cluster"
TAG_GROUP = "sm-group"
TAG_REGION = "sm-region"
TAG_ROLE = "sm-role"

LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")

# what one region's entry of ``launchConfig.placement`` may hold, per provider (the API's names; groups.py
# validates them, the provider reads them from ``LaunchRequest.placement``)
EC2_PLACEMENT_FIELDS = ("subnets", "securityGroups", "instanceProfile", "publicIp")
GCE_PLACEMENT_FIELDS = ("network", "subnetwork", "serviceAccount", "scopes", "publicIp")
# the scopes of a GCE node's service account unless its placement names others: Google's advice for a
# custom service account (what the node may do is then decided by the account's IAM roles)
DEFAULT_GCE_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class ProviderError(RuntimeError):
    """A provider call failed (the cloud refused it, or could not be reached).

    ``unconfirmed``: the request may have reached the cloud and been carried out, but no answer came back
    (a read timeout, a connection dropped after the request was sent, an operation still running at the
    deadline). A launch failing so may have made an instance: the sweep finds out.

    ``unreachable``: the request never reached the cloud (connection refused, connect timeout, a name
    that does not resolve): nothing was done, and nothing in the request was wrong."""

    def __init__(self, message: str, *, unconfirmed: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.unconfirmed = unconfirmed
        self.unreachable = unreachable


def _never_connected(exc: BaseException) -> bool:
    """Whether a connection error's chain of causes says the connection was never made."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ConnectionRefusedError, socket.gaierror)) or type(cause).__name__ in (
                "NewConnectionError", "NameResolutionError"):
            return True
        cause = getattr(cause, "reason", None) or (cause.args[0] if cause.args and
                                                    isinstance(cause.args[0], BaseException) else None)
    return False


def is_unconfirmed(exc: BaseException) -> bool:
    """True when ``exc`` (from an HTTP call to a cloud) leaves open whether the cloud carried the call out."""
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return False  # never connected: nothing was sent
    if isinstance(exc, requests.Timeout):
        return True  # sent, the answer did not come in time
    if isinstance(exc, requests.ConnectionError):
        return not _never_connected(exc)  # e.g. 'Connection aborted.': RemoteDisconnected, reset after sending
    return "did not complete in" in str(getattr(exc, "value", exc))  # libcloud's polling deadline (GCE operations)


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (from an HTTP call to a cloud) says the request never reached it."""
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, (requests.ConnectionError, OSError)):
        return _never_connected(exc)
    return False


@dataclass(frozen=True)
class LaunchRequest:
    cluster_id: str
    group: str
    region: str
    role: str  # origin | edge
    name: str  # unique instance name, lowercase letters, digits and '-'
    image: str
    size: str
    boot_script: str  # user data / startup-script, already rendered
    capacity: int
    media: str = "nginx"  # nginx | none (the local provider runs the agent with this)
    # this region's entry of launchConfig.placement (EC2_/GCE_PLACEMENT_FIELDS, validated); empty: the
    # cloud's defaults (default VPC / network, no instance profile, the project's default service account)
    placement: Mapping[str, Any] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        return {TAG_CLUSTER: self.cluster_id, TAG_GROUP: self.group, TAG_REGION: self.region,
                TAG_ROLE: self.role}


@dataclass(frozen=True)
class Instance:
    id: str  # provider's instance id (what destroy takes)
    name: str
    state: str  # libcloud NodeState value as a string: running, pending, terminated, stopped, unknown...
    cluster_id: str
    group: str
    region: str
    role: str
    address: str | None = None  # public (or only) IP
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Listing:
    instances: list[Instance]
    unlisted: Mapping[str, str] = field(default_factory=dict)  # region -> why its listing failed


class CloudProvider(abc.ABC):
    """One cloud account (or the local machine) as the controller sees it."""

    name: str = "abstract"

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> Instance:
        """Create one instance with the request's tags and boot script; raise ProviderError on failure."""

    @abc.abstractmethod
    def list_instances(self, cluster_id: str) -> list[Instance]:
        """Instances (not yet gone) tagged with ``cluster_id``; raise ProviderError on failure."""

    def listing(self, cluster_id: str) -> "Listing":
        """:meth:`list_instances`, for a provider that lists region by region: what the regions that
        answered hold, and which did not answer (nothing is known there). Raises ProviderError only
        when no region answered. A provider that lists everything in one call answers all or nothing."""
        return Listing(self.list_instances(cluster_id))

    @abc.abstractmethod
    def destroy(self, instance_id: str, cluster_id: str) -> bool:
        """Destroy an instance of this cluster; False when it is already gone. Refuses (ProviderError)
        an instance whose cluster tag differs."""

    def know_regions(self, regions) -> None:
        """Regions where this cluster may have instances (the groups' regions): a provider whose API
        is per region lists them too."""

    def close(self) -> None:
        """Release what the provider holds (connections, local processes it must not orphan)."""


DEFAULT_BOOT_SCRIPT = """#!/bin/sh
# streammanager node boot script: installs and starts the node agent for this instance
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3-venv nginx libnginx-mod-rtmp ffmpeg
python3 -m venv /opt/streammanager
/opt/streammanager/bin/pip install -q '${package}'
cat > /etc/systemd/system/node-agent.service <<UNIT
[Unit]
Description=streammanager node agent
After=network-online.target
[Service]
Environment=AGENT_ZK_HOSTS=${zk_hosts}
Environment=AGENT_ZK_ROOT=${zk_root}
Environment=AGENT_ZK_AUTH=${zk_auth}
ExecStart=/opt/streammanager/bin/node-agent --role ${role} --region ${region} --group ${group} \\
  --capacity ${capacity} --media ${media} --node-id ${node_id} --host $$(hostname -I | cut -d' ' -f1)
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now node-agent
"""

BOOT_SCRIPT_VARIABLES = ("package", "zk_hosts", "zk_root", "zk_auth", "role", "region", "group", "capacity",
                         "media", "node_id", "cluster_id")


def render_boot_script(template: str, **values: object) -> str:
    """Fill ``${name}`` placeholders; an unknown placeholder is an error (KeyError), ``$$`` is a '$'."""
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})
