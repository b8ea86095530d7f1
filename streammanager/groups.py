"""Node groups and the instances the controller launches for them: frozen records, one codec each.

A node group says, per region and role, how many nodes may run (min, max, increment), when to grow
and shrink (the scale policy) and how to launch a node (the launch configuration). The API stores
groups; the controller reads them and keeps one :class:`InstanceRecord` per instance it launched.

Validation happens here, in one place: :meth:`NodeGroup.from_api` turns a client's JSON document into
a group or raises :class:`GroupError` with a message a human can act on.
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import orjson

from streammanager.models import ROLES, SCHEMA_VERSION, RecordError
from streammanager.regions import is_known

PROVIDERS = ("local", "ec2", "gce")
MEDIA = ("nginx", "none")
GROUP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
GCE_REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
MAX_NODES_PER_POOL = 1000
MAX_BOOT_SCRIPT_BYTES = 16 * 1024  # EC2 user data is capped at 16 KB
MAX_DURATION_S = 7 * 24 * 3600  # any policy duration; beyond it is a typo (and overflows ms arithmetic)
MAX_CAPACITY = 1_000_000  # per node; ints must also fit the 64-bit JSON codec

# launchConfig.placement: where a region's nodes are launched (per provider; see cloud.base)
EC2_SUBNET = re.compile(r"subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?")
EC2_SECURITY_GROUP = re.compile(r"sg-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_IAM_NAME = r"[\w+=,.@-]{1,128}"
EC2_INSTANCE_PROFILE = re.compile(rf"{_IAM_NAME}|arn:aws:iam::\d{{12}}:instance-profile/(?:[\w+=,.@-]+/)*{_IAM_NAME}",
                                  re.ASCII)
_GCE_NAME = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
_GCE_LINK = r"(?:https://www\.googleapis\.com/compute/v1/)?projects/[a-z][-a-z0-9.:]{0,61}[a-z0-9]"
GCE_NETWORK = re.compile(rf"{_GCE_NAME}|{_GCE_LINK}/global/networks/{_GCE_NAME}")
GCE_SUBNETWORK = re.compile(rf"{_GCE_NAME}|{_GCE_LINK}/regions/(?P<region>[a-z0-9-]+)/subnetworks/{_GCE_NAME}")
GCE_SERVICE_ACCOUNT = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}@[a-z0-9][a-z0-9.-]{0,99}\.gserviceaccount\.com")
GCE_SCOPE = re.compile(r"(?:https://www\.googleapis\.com/auth/)?[a-z0-9][a-z0-9._-]{0,99}")
MAX_SUBNETS = 16
MAX_SECURITY_GROUPS = 16  # EC2's limit per network interface
MAX_SCOPES = 32

# instance lifecycle
REQUESTED = "requested"
STARTING = "starting"
INSERVICE = "inservice"
DRAINING = "draining"
TERMINATING = "terminating"
GONE = "gone"
FAILED = "failed"
LIFECYCLE = (REQUESTED, STARTING, INSERVICE, DRAINING, TERMINATING, GONE, FAILED)
ACTIVE = (REQUESTED, STARTING, INSERVICE)  # count towards a pool's size


class GroupError(RecordError):
    """A node group document that is not valid; the message says which field and why."""


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple, where: str, default: Any = ...) -> Any:
    if name not in doc or doc[name] is None:
        if default is ...:
            raise GroupError(f"{where}{name} is required")
        return default
    value = doc[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise GroupError(f"{where}{name} must be {_kind_name(kinds)}, not a boolean")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise GroupError(f"{where}{name} must be a finite number") from None
    if not isinstance(value, kinds):
        raise GroupError(f"{where}{name} must be {_kind_name(kinds)}")
    if isinstance(value, float) and not math.isfinite(value):  # Flask's JSON parser accepts NaN, Infinity
        raise GroupError(f"{where}{name} must be a finite number")
    if isinstance(value, str):
        try:  # JSON's "\ud800" is a lone surrogate: Python takes it, orjson (the store) and UTF-8 do not
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise GroupError(f"{where}{name} must be valid Unicode text (no lone surrogates)") from None
    return value


def _kind_name(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", bool: "a boolean",
             list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _no_extra(doc: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise GroupError(f"{where}unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """How many nodes of one role one region may have."""

    min: int
    max: int
    increment: int = 1

    @classmethod
    def from_api(cls, doc: Any, where: str) -> "PoolLimits":
        if not isinstance(doc, dict):
            raise GroupError(f"{where} must be an object with min, max and increment")
        _no_extra(doc, ("min", "max", "increment"), where + ".")
        low = _field(doc, "min", int, where + ".")
        high = _field(doc, "max", int, where + ".")
        step = _field(doc, "increment", int, where + ".", 1)
        if low < 0:
            raise GroupError(f"{where}.min must not be negative")
        if high < low:
            raise GroupError(f"{where}.min ({low}) is over max ({high})")
        if high > MAX_NODES_PER_POOL:
            raise GroupError(f"{where}.max must be at most {MAX_NODES_PER_POOL}")
        if not 1 <= step <= MAX_NODES_PER_POOL:
            raise GroupError(f"{where}.increment must be from 1 to {MAX_NODES_PER_POOL}")
        return cls(low, high, step)

    def to_api(self) -> dict:
        return {"min": self.min, "max": self.max, "increment": self.increment}


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    scale_out_at: float = 0.6  # share of capacity in use at or above which a pool grows
    scale_in_below: float = 0.2  # share below which it shrinks
    evaluation_interval_s: float = 2.0
    warm_up_s: float = 5.0  # after a node enters service, wait this long before growing again
    cool_down_s: float = 10.0  # after any scaling action, wait this long before shrinking
    drain_timeout_s: float = 60.0  # a draining node is terminated when empty or after this long
    boot_timeout_s: float = 300.0  # a launched node must register within this long
    failure_budget: int = 3  # failed launches within the window that pause growth
    failure_window_s: float = 600.0

    API_FIELDS = {
        "scaleOutAt": "scale_out_at", "scaleInBelow": "scale_in_below",
        "evaluationIntervalS": "evaluation_interval_s", "warmUpS": "warm_up_s", "coolDownS": "cool_down_s",
        "drainTimeoutS": "drain_timeout_s", "bootTimeoutS": "boot_timeout_s",
        "failureBudget": "failure_budget", "failureWindowS": "failure_window_s",
    }

    @classmethod
    def from_api(cls, doc: Any) -> "ScalePolicy":
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise GroupError("scalePolicy must be an object")
        where = "scalePolicy."
        _no_extra(doc, tuple(cls.API_FIELDS), where)
        values = {}
        for api_name, attr in cls.API_FIELDS.items():
            kind = int if attr == "failure_budget" else float
            values[attr] = _field(doc, api_name, kind, where, getattr(cls(), attr))
        policy = cls(**values)
        if not 0.0 < policy.scale_out_at <= 1.0:
            raise GroupError("scalePolicy.scaleOutAt must be over 0 and at most 1")
        if not 0.0 <= policy.scale_in_below < policy.scale_out_at:
            raise GroupError("scalePolicy.scaleInBelow must be at least 0 and under scaleOutAt")
        for attr in ("evaluation_interval_s", "boot_timeout_s", "failure_window_s"):
            if getattr(policy, attr) <= 0:
                raise GroupError(f"scalePolicy.{_api_name(attr)} must be positive")
        for attr in ("warm_up_s", "cool_down_s", "drain_timeout_s"):
            if getattr(policy, attr) < 0:
                raise GroupError(f"scalePolicy.{_api_name(attr)} must not be negative")
        for attr in ("evaluation_interval_s", "warm_up_s", "cool_down_s", "drain_timeout_s", "boot_timeout_s",
                     "failure_window_s"):
            if getattr(policy, attr) > MAX_DURATION_S:
                raise GroupError(f"scalePolicy.{_api_name(attr)} must be at most {MAX_DURATION_S} s")
        if not 1 <= policy.failure_budget <= MAX_NODES_PER_POOL:
            raise GroupError(f"scalePolicy.failureBudget must be from 1 to {MAX_NODES_PER_POOL}")
        return policy

    def to_api(self) -> dict:
        return {api: getattr(self, attr) for api, attr in self.API_FIELDS.items()}


def _api_name(attr: str) -> str:
    return next(k for k, v in ScalePolicy.API_FIELDS.items() if v == attr)


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    provider: str = "local"
    image: str = ""
    size: str = ""
    media: str = "nginx"
    capacity: Mapping[str, int] = field(default_factory=lambda: {"origin": 50, "edge": 200})
    boot_script: str | None = None  # template; None means the built-in one
    # region -> where its nodes are launched: the provider's fields (cloud.base.EC2_/GCE_PLACEMENT_FIELDS,
    # API names, every default filled in); a region without an entry gets the cloud's defaults
    placement: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_api(cls, doc: Any) -> "LaunchConfig":
        if not isinstance(doc, dict):
            raise GroupError("launchConfig is required: an object with provider, image, size, capacity")
        where = "launchConfig."
        _no_extra(doc, ("provider", "image", "size", "media", "capacity", "bootScript", "placement"), where)
        provider = _field(doc, "provider", str, where)
        if provider not in PROVIDERS:
            raise GroupError(f"launchConfig.provider {provider[:40]!r} is unknown (known: {', '.join(PROVIDERS)})")
        image = _field(doc, "image", str, where, "")
        size = _field(doc, "size", str, where, "")
        if provider != "local" and (not image or not size):
            raise GroupError(f"launchConfig.image and launchConfig.size are required for provider {provider}")
        media = _field(doc, "media", str, where, "nginx")
        if media not in MEDIA:
            raise GroupError(f"launchConfig.media must be one of {', '.join(MEDIA)}")
        raw_capacity = _field(doc, "capacity", dict, where, {"origin": 50, "edge": 200})
        _no_extra(raw_capacity, ROLES, where + "capacity.")
        capacity = {}
        for role in ROLES:
            value = _field(raw_capacity, role, int, where + "capacity.", 50 if role == "origin" else 200)
            if not 1 <= value <= MAX_CAPACITY:
                raise GroupError(f"launchConfig.capacity.{role} must be from 1 to {MAX_CAPACITY}")
            capacity[role] = value
        boot_script = _field(doc, "bootScript", str, where, None)
        if boot_script is not None:
            if len(boot_script.encode()) > MAX_BOOT_SCRIPT_BYTES:
                raise GroupError(f"launchConfig.bootScript is longer than {MAX_BOOT_SCRIPT_BYTES} bytes")
            _check_template(boot_script)
        placement = _placement_from_api(provider, doc.get("placement"))
        return cls(provider, image, size, media, capacity, boot_script, placement)

    def to_api(self) -> dict:
        doc = {"provider": self.provider, "image": self.image, "size": self.size, "media": self.media,
               "capacity": dict(self.capacity)}
        if self.boot_script is not None:
            doc["bootScript"] = self.boot_script
        if self.placement:
            doc["placement"] = {region: {name: list(value) if isinstance(value, (list, tuple)) else value
                                         for name, value in entry.items()}
                                for region, entry in self.placement.items()}
        return doc


def _placement_from_api(provider: str, doc: Any) -> dict[str, dict[str, Any]]:
    """``launchConfig.placement``: region -> the provider's placement fields, validated, defaults filled."""
    where = "launchConfig.placement"
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise GroupError(f"{where} must be an object: region -> where that region's nodes are launched")
    if provider not in ("ec2", "gce"):
        if doc:
            raise GroupError(f"{where} is not supported by provider {provider} (only ec2 and gce)")
        return {}
    placement = {}
    for region, entry in doc.items():
        try:
            _check_region(provider, region)
        except GroupError as exc:
            raise GroupError(f"{where}: {exc}") from None
        if not isinstance(entry, dict):
            raise GroupError(f"{where}.{region} must be an object")
        parse = _ec2_placement if provider == "ec2" else _gce_placement
        placement[region] = parse(entry, f"{where}.{region}.", region)
    return placement


def _ec2_placement(doc: Mapping[str, Any], where: str, region: str) -> dict[str, Any]:
    from streammanager.cloud.base import EC2_PLACEMENT_FIELDS

    _no_extra(doc, EC2_PLACEMENT_FIELDS, where)
    subnets = _string_list(doc, "subnets", where, EC2_SUBNET, MAX_SUBNETS, "a subnet id (subnet-...)")
    groups = _string_list(doc, "securityGroups", where, EC2_SECURITY_GROUP, MAX_SECURITY_GROUPS,
                          "a security group id (sg-...)")
    if groups and not subnets:
        raise GroupError(f"{where}securityGroups needs subnets (EC2 takes security group ids only with a subnet)")
    profile = _field(doc, "instanceProfile", str, where, "")
    if profile and not EC2_INSTANCE_PROFILE.fullmatch(profile):
        raise GroupError(f"{where}instanceProfile {profile[:80]!r} is not an instance profile name or ARN "
                         "(arn:aws:iam::ACCOUNT:instance-profile/NAME)")
    public_ip = _field(doc, "publicIp", bool, where, True)
    return {"subnets": subnets, "securityGroups": groups, "instanceProfile": profile, "publicIp": public_ip}


def _gce_placement(doc: Mapping[str, Any], where: str, region: str) -> dict[str, Any]:
    from streammanager.cloud.base import DEFAULT_GCE_SCOPES, GCE_PLACEMENT_FIELDS

    _no_extra(doc, GCE_PLACEMENT_FIELDS, where)
    network = _field(doc, "network", str, where, "")
    if network and not GCE_NETWORK.fullmatch(network):
        raise GroupError(f"{where}network {network[:80]!r} is not a network name or link "
                         "(projects/PROJECT/global/networks/NAME)")
    subnetwork = _field(doc, "subnetwork", str, where, "")
    if subnetwork:
        match = GCE_SUBNETWORK.fullmatch(subnetwork)
        if not match:
            raise GroupError(f"{where}subnetwork {subnetwork[:80]!r} is not a subnetwork name or link "
                             "(projects/PROJECT/regions/REGION/subnetworks/NAME)")
        if match.group("region") and match.group("region") != region:
            raise GroupError(f"{where}subnetwork is in region {match.group('region')!r}, not {region!r}")
        if not network:
            raise GroupError(f"{where}subnetwork needs network (the VPC network the subnetwork belongs to)")
    account = _field(doc, "serviceAccount", str, where, "")
    if account and not GCE_SERVICE_ACCOUNT.fullmatch(account):
        raise GroupError(f"{where}serviceAccount {account[:80]!r} is not a service account e-mail "
                         "(NAME@PROJECT.iam.gserviceaccount.com)")
    scopes = _string_list(doc, "scopes", where, GCE_SCOPE, MAX_SCOPES,
                          "an OAuth scope (https://www.googleapis.com/auth/... or an alias such as cloud-platform)")
    if scopes and not account:
        raise GroupError(f"{where}scopes needs serviceAccount (the scopes are that account's)")
    if account and not scopes:
        scopes = list(DEFAULT_GCE_SCOPES)
    public_ip = _field(doc, "publicIp", bool, where, True)
    return {"network": network, "subnetwork": subnetwork, "serviceAccount": account, "scopes": scopes,
            "publicIp": public_ip}


def _string_list(doc: Mapping[str, Any], name: str, where: str, pattern: re.Pattern, max_items: int,
                 what: str) -> list[str]:
    values = _field(doc, name, list, where, [])
    if len(values) > max_items:
        raise GroupError(f"{where}{name} may hold at most {max_items} items")
    for index, value in enumerate(values):
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise GroupError(f"{where}{name}[{index}] {str(value)[:80]!r} is not {what}")
    repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
    if repeated is not None:
        raise GroupError(f"{where}{name} lists {repeated!r} twice")
    return list(values)


def _check_template(text: str) -> None:
    import string

    from streammanager.cloud.base import BOOT_SCRIPT_VARIABLES

    try:
        string.Template(text).substitute({name: "x" for name in BOOT_SCRIPT_VARIABLES})
    except KeyError as exc:
        raise GroupError(f"launchConfig.bootScript uses an unknown variable ${{{exc.args[0]}}} "
                         f"(known: {', '.join(BOOT_SCRIPT_VARIABLES)})") from None
    except ValueError as exc:
        raise GroupError(f"launchConfig.bootScript is not a valid template: {exc}") from None


GCE_MAX_NAME = 63  # GCE's limit on instance names


def new_instance_id(group: str, region: str, role: str) -> str:
    """A new instance's id (and its name at the provider): ``<group>-<region>-<role>-<6 hex>``."""
    return f"{group}-{region}-{role}-{secrets.token_hex(3)}"


def _check_region(provider: str, region: str, group: str = "") -> None:
    if not isinstance(region, str) or not is_known(region):
        raise GroupError(f"region {str(region)[:40]!r} is unknown")
    if provider == "ec2" and not AWS_REGION.match(region):
        raise GroupError(f"region {region!r} is not an AWS region (provider ec2)")
    if provider == "gce" and not GCE_REGION.match(region):
        raise GroupError(f"region {region!r} is not a GCE region (provider gce)")
    longest_id = max(len(new_instance_id(group, region, role)) for role in ROLES)
    if provider == "gce" and longest_id > GCE_MAX_NAME:
        longest = len(group) - (longest_id - GCE_MAX_NAME)
        raise GroupError(f"the group name {group!r} is too long for region {region} on GCE: instance names "
                         f"(<group>-<region>-<role>-<id>) take at most {GCE_MAX_NAME} characters, so at most "
                         f"{longest} for the group name there")


@dataclass(frozen=True, slots=True)
class NodeGroup:
    name: str
    launch: LaunchConfig
    regions: Mapping[str, Mapping[str, PoolLimits]]  # region -> role -> limits
    policy: ScalePolicy = ScalePolicy()

    @classmethod
    def from_api(cls, doc: Any, name: str | None = None) -> "NodeGroup":
        """Validate a client's document. ``name`` (from the URL, for an update) must match the body's
        name when the body has one."""
        if not isinstance(doc, dict):
            raise GroupError("the body must be a JSON object describing the node group")
        _no_extra(doc, ("name", "launchConfig", "regions", "scalePolicy"), "")
        body_name = doc.get("name")
        if name is not None and body_name is not None and body_name != name:
            raise GroupError(f"the body's name {str(body_name)[:40]!r} differs from the URL's {name!r}")
        group_name = name if name is not None else body_name
        validate_group_name(group_name)
        launch = LaunchConfig.from_api(doc.get("launchConfig"))
        raw_regions = doc.get("regions")
        if not isinstance(raw_regions, dict) or not raw_regions:
            raise GroupError("regions must be an object with at least one region")
        regions: dict[str, dict[str, PoolLimits]] = {}
        for region, roles in raw_regions.items():
            _check_region(launch.provider, region, group_name)
            if not isinstance(roles, dict) or not roles:
                raise GroupError(f"regions.{region} must be an object with origin and/or edge limits")
            _no_extra(roles, ROLES, f"regions.{region}.")
            regions[region] = {role: PoolLimits.from_api(limits, f"regions.{region}.{role}")
                               for role, limits in roles.items()}
        stray = [region for region in launch.placement if region not in regions]
        if stray:
            raise GroupError(f"launchConfig.placement.{stray[0]} is not a region of this group "
                             f"(regions: {', '.join(regions)})")
        return cls(group_name, launch, regions, ScalePolicy.from_api(doc.get("scalePolicy")))

    def to_api(self) -> dict:
        return {
            "name": self.name,
            "launchConfig": self.launch.to_api(),
            "regions": {region: {role: limits.to_api() for role, limits in roles.items()}
                        for region, roles in self.regions.items()},
            "scalePolicy": self.policy.to_api(),
        }

    def pools(self):
        """(region, role, limits) for every pool of the group."""
        for region, roles in self.regions.items():
            for role, limits in roles.items():
                yield region, role, limits

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, **self.to_api()})

    @classmethod
    def from_json(cls, data: bytes) -> "NodeGroup":
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RecordError(f"bad node group record: {exc}") from exc
        if not isinstance(doc, dict) or doc.pop("schema", None) != SCHEMA_VERSION:
            raise RecordError("node group record has an unknown schema")
        return cls.from_api(doc)


def validate_group_name(name: Any) -> str:
    if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
        raise GroupError(
            f"group name {str(name)[:40]!r} is not valid: 1 to 32 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-' (it becomes a cloud label)")
    return name


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance the controller launched (persistent znode ``instances/<id>``).

    ``id`` is ours, chosen before launch; it is the instance's name at the provider and its node
    agent's node id, which is how the controller matches a registration to an instance.
    """

    id: str
    group: str
    region: str
    role: str
    provider: str
    state: str = REQUESTED
    provider_id: str = ""  # the cloud's own id, once launched
    created_ms: int = 0
    state_since_ms: int = 0
    registered_ms: int = 0  # when its node first registered (0: never yet)
    drain_deadline_ms: int = 0
    failure: str = ""  # why it failed (counts against the failure budget)
    reason: str = ""  # why it is in its state (for operators)

    def __post_init__(self) -> None:
        if self.state not in LIFECYCLE:
            raise RecordError(f"instance state must be one of {LIFECYCLE}, not {self.state!r}")
        if self.role not in ROLES:
            raise RecordError(f"instance role must be one of {ROLES}")

    def moved(self, state: str, now_ms: int, reason: str, **changes: Any) -> "InstanceRecord":
        return replace(self, state=state, state_since_ms=now_ms, reason=reason, **changes)

    def to_json(self) -> bytes:
        return orjson.dumps({"schema": SCHEMA_VERSION, "id": self.id, "group": self.group,
                             "region": self.region, "role": self.role, "provider": self.provider,
                             "state": self.state, "provider_id": self.provider_id,
                             "created_ms": self.created_ms, "state_since_ms": self.state_since_ms,
                             "registered_ms": self.registered_ms, "drain_deadline_ms": self.drain_deadline_ms,
                             "failure": self.failure, "reason": self.reason})

    @classmethod
    def from_json(cls, data: bytes) -> "InstanceRecord":
        try:
            doc = orjson.loads(data)
            if doc.get("schema") != SCHEMA_VERSION:
                raise RecordError("instance record has an unknown schema")
            return cls(**{k: v for k, v in doc.items() if k != "schema"})
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            raise RecordError(f"bad instance record: {exc}") from exc
