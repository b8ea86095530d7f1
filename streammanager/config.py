"""Configuration: every setting is an environment variable and a command-line option.

Parsed once into a frozen, validated settings object; nothing else reads ``os.environ``. Bad values
fail at start-up with a message naming the variable.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # coordinator_config imports this module
    from streammanager.coordinator_config import EventCallbackSettings, HttpAuth


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Option:
    field: str  # settings attribute
    env: str  # environment variable
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be positive, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        if opt.secret:
            shown = "unset" if opt.default is None else "(hidden)"
        elif isinstance(opt.default, bool):  # as it is written: on or off (the README's words)
            shown = "on" if opt.default else "off"
        else:
            shown = "unset" if opt.default is None else opt.default
        parser.add_argument(
            opt.flag, dest=opt.field, default=None, choices=opt.choices,
            help=f"{opt.help} [env {opt.env}, default {shown!s}]",
        )


def _shown(raw: str) -> str:
    """A value as an error may print it: a URL's ``user:password@`` hidden."""
    return _URL_CREDENTIALS.sub("(hidden)@", raw)


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def resolve(options: Sequence[Option], args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """Command line over environment over default; each value converted and validated."""
    values: dict[str, Any] = {}
    for opt in options:
        raw = getattr(args, opt.field, None)
        source = opt.flag
        if raw is None:
            raw = env.get(opt.env)
            source = opt.env
        if raw is None or raw == "":
            values[opt.field] = opt.default
            continue
        try:
            value = opt.type(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: bad value {_shown(raw) if not opt.secret else '(hidden)'!r}: {exc}") from None
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{source}: must be one of {', '.join(opt.choices)}")
        values[opt.field] = value
    return values


def redacted_repr(settings: Any, options: Sequence[Option]) -> str:
    """``Name({field: value})`` with every secret option shown only as set or not."""
    secret = {opt.field for opt in options if opt.secret}
    shown = {f.name: (("(set)" if getattr(settings, f.name) else None) if f.name in secret
                      else getattr(settings, f.name)) for f in fields(settings)}
    return f"{type(settings).__name__}({shown})"


def port(text: str) -> int:
    """A TCP port, 1 to 65535 (``int`` alone took 70000, which the socket layer wrapped to another port)."""
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(f"must be a port from 1 to 65535, not {text}")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return text


_ZK_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ZK_PASSWORD = re.compile(r"[A-Za-z0-9._~+/=-]{12,256}")


def zk_credentials(text: str) -> str:
    """``user:password`` of ZooKeeper's digest scheme. The password is at least 12 characters of
    letters, digits and ``. _ ~ + / = -`` (``openssl rand -base64 24`` makes one): it goes into a node's
    boot script and systemd unit, where other characters would need quoting."""
    user, sep, password = text.partition(":")
    if not sep or not _ZK_USER.fullmatch(user):
        raise ValueError("expected USER:PASSWORD, the user of letters, digits and . _ -")
    if not _ZK_PASSWORD.fullmatch(password):
        raise ValueError("the password must be 12 to 256 letters, digits or . _ ~ + / = -")
    return text


def zk_auth_option(env: str) -> Option:
    return Option("zk_auth", env, None,
                  "USER:PASSWORD: authenticate to ZooKeeper (digest) and create every znode readable and "
                  "writable by that identity only; the same on every process of the cluster (unset: open znodes)",
                  zk_credentials, secret=True)


SERVER_OPTIONS: tuple[Option, ...] = (
    Option("zk_hosts", "SM_ZK_HOSTS", "127.0.0.1:2181", "ZooKeeper connection string (host:port,...)"),
    Option("zk_root", "SM_ZK_ROOT", "/streammanager", "root znode of this cluster"),
    Option("zk_timeout_s", "SM_ZK_TIMEOUT_S", 4.0, "ZooKeeper session timeout, seconds", positive(float)),
    zk_auth_option("SM_ZK_AUTH"),
    Option("access_token", "SM_ACCESS_TOKEN", None, "admin access token; unset refuses every admin call",
           secret=True),
    Option("bind", "SM_BIND", "127.0.0.1:5080", "address the API server listens on", host_port),
    Option("workers", "SM_WORKERS", 2, "gunicorn worker processes", positive(int)),
    Option("reuse_port", "SM_REUSE_PORT", True,
           "a listening socket per worker (SO_REUSEPORT): the kernel spreads connections evenly; off: one "
           "shared socket, which a restarting worker does not take connections from until it is ready",
           boolean),
    Option("registry_feed", "SM_REGISTRY_FEED", True,
           "one registry watcher per host feeding every worker (streammanager.feed); off: each worker "
           "watches ZooKeeper itself", boolean),
    Option("threads", "SM_THREADS", 2,
           "threads per worker for the routes Flask answers (admin, stats, listings, metrics, dashboard), and "
           "as many for broadcast lookups; subscribe lookups and /healthz are answered on the worker's event loop",
           positive(int)),
    Option("heartbeat_max_age_s", "SM_HEARTBEAT_MAX_AGE_S", 180.0,
           "a node whose record is older is not chosen (a backstop: agents rewrite an unchanged record every "
           "60 s, and one whose loop stalls closes its session within 15 s)", positive(float)),
    Option("reservation_ttl_s", "SM_RESERVATION_TTL_S", 30.0,
           "how long a broadcast lookup holds its origin for a stream that is not live yet", positive(float)),
    Option("assignment_ttl_s", "SM_ASSIGNMENT_TTL_S", 3.0,
           "how long an answer counts against its node before load reports include it", positive(float)),
    Option("best_few", "SM_BEST_FEW", 2, "random pick among this many best-weighted nodes", positive(int)),
    Option("log_level", "SM_LOG_LEVEL", "INFO", "log level", str.upper,
           ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_format", "SM_LOG_FORMAT", "json", "log format", str.lower, ("json", "text")),
)


@dataclass(frozen=True)
class ServerSettings:
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/streammanager"
    zk_timeout_s: float = 4.0
    zk_auth: str | None = None  # digest USER:PASSWORD
    access_token: str | None = None
    bind: str = "127.0.0.1:5080"
    workers: int = 2
    reuse_port: bool = True
    registry_feed: bool = True
    threads: int = 2
    heartbeat_max_age_s: float = 180.0
    reservation_ttl_s: float = 30.0
    assignment_ttl_s: float = 3.0
    best_few: int = 2
    log_level: str = "INFO"
    log_format: str = "json"
    # COMMANDS_API_AUTH and its credentials (coordinator_config.COMMANDS_API_OPTIONS); None: no auth
    commands_auth: HttpAuth | None = None  # its repr hides the secrets
    feed_socket: str | None = None  # set by ``serve`` for its workers: the host's registry feed

    def __repr__(self) -> str:  # never print the token
        return redacted_repr(self, SERVER_OPTIONS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None
                 ) -> "ServerSettings":
        from streammanager.coordinator_config import commands_auth_from  # it imports this module

        env = os.environ if env is None else env
        return cls(**resolve(SERVER_OPTIONS, args or argparse.Namespace(), env),
                   commands_auth=commands_auth_from(args, env))


def loopback_pool(text: str) -> str:
    from streammanager.cloud.local import address_pool

    address_pool(text)
    return text


def bind_or_off(text: str) -> str:
    return text if text.lower() in ("", "off") else host_port(text)


CONTROLLER_OPTIONS: tuple[Option, ...] = (
    Option("zk_hosts", "SM_ZK_HOSTS", "127.0.0.1:2181", "ZooKeeper connection string (host:port,...)"),
    Option("zk_root", "SM_ZK_ROOT", "/streammanager", "root znode of this cluster"),
    Option("zk_timeout_s", "SM_ZK_TIMEOUT_S", 4.0, "ZooKeeper session timeout, seconds", positive(float)),
    zk_auth_option("SM_ZK_AUTH"),
    Option("cluster_id", "SM_CLUSTER_ID", "streammanager",
           "this cluster's id, put on every instance as a tag/label; the controller touches no instance "
           "without it (lowercase letters, digits, '-' and '_', at most 63 characters)"),
    Option("controller_id", "SM_CONTROLLER_ID", None, "this controller's name in the election "
           "(default: host name and pid)"),
    Option("tick_s", "SM_CONTROLLER_TICK_S", 0.5,
           "how often the leader advances instance lifecycles; each group's policy is evaluated at its "
           "own evaluationIntervalS", positive(float)),
    Option("sweep_interval_s", "SM_CONTROLLER_SWEEP_S", 30.0,
           "how often the leader lists the providers' instances to adopt or remove strays", positive(float)),
    Option("absence_grace_s", "SM_ABSENCE_GRACE_S", 15.0,
           "an in-service node missing from the registry is replaced (a draining one terminated) only after "
           "this long: a ZooKeeper outage past the session timeout expires every agent's session, and they "
           "register again a few seconds after it", positive(float)),
    Option("metrics_bind", "SM_CONTROLLER_METRICS_BIND", "off",
           "address of the controller's Prometheus /metrics (host:port, or off)", bind_or_off),
    Option("node_package", "SM_NODE_PACKAGE", "streammanager",
           "what a cloud node's boot script pip-installs (a version pin or a wheel URL)"),
    Option("local_state_dir", "SM_LOCAL_STATE_DIR", "var/local-cloud",
           "local provider: where instances' state and logs live"),
    Option("local_pool", "SM_LOCAL_POOL", "127.0.1.64/26",
           "local provider: loopback addresses for instances (CIDR or first-last)", loopback_pool),
    Option("local_http_port", "SM_LOCAL_HTTP_PORT", 8090, "local provider: agents' HTTP port",
           port),
    Option("local_agent_args", "SM_LOCAL_AGENT_ARGS", "",
           "local provider: extra node-agent options, space-separated"),
    Option("ec2_credentials", "SM_EC2_CREDENTIALS", "static",
           "ec2 provider: where its AWS credentials come from: static (SM_EC2_ACCESS_KEY and SM_EC2_SECRET_KEY; "
           "the provider is on when both are set) or instance-role (the provider is on, with AWS's default "
           "credential chain through botocore: on EC2 the instance role's temporary credentials from IMDSv2, "
           "elsewhere AWS_* environment variables, a profile or a container role; refreshed before they expire)",
           str.lower, ("static", "instance-role")),
    Option("ec2_access_key", "SM_EC2_ACCESS_KEY", None, "ec2 provider: access key id", secret=True),
    Option("ec2_secret_key", "SM_EC2_SECRET_KEY", None, "ec2 provider: secret access key", secret=True),
    Option("ec2_region", "SM_EC2_REGION", "us-east-1", "ec2 provider: home region (where strays are looked for)"),
    Option("ec2_endpoint", "SM_EC2_ENDPOINT", None,
           "ec2 provider: endpoint URL instead of AWS's (e.g. a moto_server for tests)"),
    Option("gce_project", "SM_GCE_PROJECT", None, "gce provider: project id (the provider is on when set)"),
    Option("gce_auth", "SM_GCE_AUTH", "service-account-key",
           "gce provider: how it authenticates: service-account-key (SM_GCE_SERVICE_ACCOUNT and SM_GCE_KEY_FILE) "
           "or metadata (the VM's own service account, tokens from the metadata server; no key)",
           str.lower, ("service-account-key", "metadata")),
    Option("gce_service_account", "SM_GCE_SERVICE_ACCOUNT", None,
           "gce provider: service account email (with SM_GCE_AUTH=metadata: optional, which of the VM's accounts)"),
    Option("gce_key_file", "SM_GCE_KEY_FILE", None, "gce provider: service account key file (JSON)"),
    Option("gce_metadata_url", "SM_GCE_METADATA_URL", "http://metadata.google.internal/computeMetadata/v1",
           "gce provider with SM_GCE_AUTH=metadata: the metadata server's base URL (tests: a local fake)"),
    Option("gce_endpoint", "SM_GCE_ENDPOINT", None,
           "gce provider: Compute API endpoint URL instead of Google's (tests)"),
    Option("log_level", "SM_LOG_LEVEL", "INFO", "log level", str.upper,
           ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_format", "SM_LOG_FORMAT", "json", "log format", str.lower, ("json", "text")),
)



@dataclass(frozen=True)
class ControllerSettings:
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/streammanager"
    zk_timeout_s: float = 4.0
    zk_auth: str | None = None  # digest USER:PASSWORD
    cluster_id: str = "streammanager"
    controller_id: str | None = None
    tick_s: float = 0.5
    sweep_interval_s: float = 30.0
    absence_grace_s: float = 15.0
    metrics_bind: str = "off"
    node_package: str = "streammanager"
    local_state_dir: str = "var/local-cloud"
    local_pool: str = "127.0.1.64/26"
    local_http_port: int = 8090
    local_agent_args: str = ""
    ec2_credentials: str = "static"  # static | instance-role
    ec2_access_key: str | None = None
    ec2_secret_key: str | None = None
    ec2_region: str = "us-east-1"
    ec2_endpoint: str | None = None
    gce_project: str | None = None
    gce_auth: str = "service-account-key"  # service-account-key | metadata
    gce_service_account: str | None = None
    gce_key_file: str | None = None
    gce_metadata_url: str = "http://metadata.google.internal/computeMetadata/v1"
    gce_endpoint: str | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    # EVENT_CALLBACK_URL, its auth and retry settings (coordinator_config.EVENT_CALLBACK_OPTIONS);
    # None: no URL, events are consumed and none is sent
    event_callback: EventCallbackSettings | None = None  # its repr hides the secrets

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", self.cluster_id or ""):
            raise ConfigError("SM_CLUSTER_ID: lowercase letters, digits, '-' and '_', at most 63 characters")

    def __repr__(self) -> str:  # never print credentials
        return redacted_repr(self, CONTROLLER_OPTIONS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None
                 ) -> "ControllerSettings":
        from streammanager.coordinator_config import event_callback_from  # it imports this module

        env = os.environ if env is None else env
        return cls(**resolve(CONTROLLER_OPTIONS, args or argparse.Namespace(), env),
                   event_callback=event_callback_from(args, env))
